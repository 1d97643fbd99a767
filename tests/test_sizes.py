import pytest

from core.sizes import iec_bytes


@pytest.mark.parametrize("n, text", [
    (0, "0 bytes"),
    (1023, "1023 bytes"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (50 << 20, "50.0 MiB"),
    (1_000_000_000, "953.7 MiB"),  # 1000-based 1 GB is under 1 GiB
    (3 << 30, "3.0 GiB"),
    (5 << 40, "5.0 TiB"),
    (2048 << 40, "2048.0 TiB"),  # TiB is the largest unit
])
def test_iec_bytes_uses_powers_of_1024_and_iec_names(n, text):
    assert iec_bytes(n) == text
