"""common.limits.check_images: the count and each image's size, the first offender named."""

from __future__ import annotations

import pytest

from common.errors import InvalidArgument
from common.limits import check_images


def test_within_the_limits_passes():
    check_images("r", [], max_images=0, max_image_bytes=0)
    check_images("r", [10, 10], max_images=2, max_image_bytes=10)


def test_too_many_images():
    with pytest.raises(InvalidArgument, match=r"^req: 3 images, above max_images=2$"):
        check_images("req", [1, 1, 1], max_images=2, max_image_bytes=10)


def test_the_first_oversized_image_is_named():
    with pytest.raises(
        InvalidArgument, match=r"images\[1\] has 11 bytes, above max_image_bytes=10"
    ):
        check_images("req", [10, 11, 12], max_images=5, max_image_bytes=10)
