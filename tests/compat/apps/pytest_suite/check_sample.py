import pytest


def add(a, b):
    return a + b


@pytest.fixture
def numbers():
    return [1, 2, 3]


def test_add():
    assert add(2, 3) == 5


@pytest.mark.parametrize("n", [1, 2, 3])
def test_positive(n):
    assert n > 0


def test_fixture(numbers, tmp_path):
    (tmp_path / "x.txt").write_text("x")
    assert sum(numbers) == 6


def test_raises():
    with pytest.raises(ZeroDivisionError):
        1 / 0
