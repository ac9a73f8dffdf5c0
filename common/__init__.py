"""EPD common: config, pools, planning, transport, integrity, errors."""
