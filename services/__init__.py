"""EPD services: encoder, language and the `epd` command."""
