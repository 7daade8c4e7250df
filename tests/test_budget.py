import pytest
from accelerate.utils import convert_file_size_to_int, infer_auto_device_map

from helpers.budget import ACCEPTED_FORMS, METHOD_BUDGET, Budget, BudgetError, detect_hardware, parse_budget, parse_size
from helpers.report import format_bytes
from helpers.errors import UserError

GiB = 2**30


def test_method_dict_form():
    b = parse_budget(METHOD_BUDGET)
    assert b.max_memory() == {0: int(8.5 * GiB), "cpu": 30 * GiB}
    assert b.names == [0, "cpu"]


def test_cli_form_with_disk_and_spaces():
    b = parse_budget(" 0=8.5GiB, cpu = 30GiB ,disk=100GiB")
    assert b.max_memory() == {0: int(8.5 * GiB), "cpu": 30 * GiB, "disk": 100 * GiB}


def test_dict_written_as_text():
    assert parse_budget('{0: "8.5GiB", "cpu": "30GiB"}') == parse_budget(METHOD_BUDGET)


def test_string_gpu_keys_and_cuda_prefix_and_byte_ints():
    b = parse_budget({"0": 1024, "cuda:1": "1MiB", "CPU": "2GB"})
    assert b.max_memory() == {0: 1024, 1: 2**20, "cpu": 2 * 10**9}


def test_tiers_sorted_gpus_first_then_mps_cpu_disk():
    b = parse_budget({"disk": "1GiB", "cpu": "1GiB", 1: "1GiB", "mps": "1GiB", 0: "1GiB"})
    assert b.names == [0, 1, "mps", "cpu", "disk"]


def test_share_of_model():
    b = parse_budget("cpu=40%,disk=100%", model_bytes=1000)
    assert b.max_memory() == {"cpu": 400, "disk": 1000}
    assert parse_budget({"cpu": "12.5%"}, model_bytes=800)["cpu"] == 100


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8.5GiB", int(8.5 * GiB)),
        ("512MiB", 512 * 2**20),
        ("64KiB", 64 * 1024),
        ("20GB", 20 * 10**9),
        ("512MB", 512 * 10**6),
        ("3KB", 3000),
        ("8gib", 8 * GiB),
        ("8gb", 8 * 10**9),  # accelerate alone would read a lower-case b as bits (1 GB)
        ("8.5 GiB", int(8.5 * GiB)),
        ("1048576", 2**20),
        (4096, 4096),
    ],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


def test_sizes_agree_with_accelerate():
    for text in ("8.5GiB", "30GiB", "512MB", "20GB"):
        assert parse_size(text) == convert_file_size_to_int(text)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "empty"),
        ("{}", "names no tier"),
        ({}, "names no tier"),
        ("gpu=8GiB", "write 0 for the first GPU"),
        ("cuda=8GiB", "write 0 for the first GPU"),
        ("ram=8GiB", "unknown tier"),
        ("0=8.5GiB,0=1GiB", "given twice"),
        ({0: "1GiB", "0": "2GiB"}, "given twice"),
        ({-1: "1GiB"}, "not a GPU index"),
        ({True: "1GiB"}, "not a tier name"),
        ({1.5: "1GiB"}, "not a tier name"),
        ("8.5GiB", "not TIER=SIZE"),
        ("0=8.5GiB;cpu=30GiB", "not a number with a unit"),
        ("cpu=8.5TB", "unknown unit"),
        ("cpu=8.5 parsecs", "unknown unit"),
        ("cpu=lots", "not a number with a unit"),
        ("cpu=-5GiB", "not a number with a unit"),
        ({"cpu": -5}, "negative"),
        ({"cpu": 1.5}, "neither a string nor a whole number"),
        ({"cpu": True}, "neither a string nor a whole number"),
        ("cpu=1.5", "not a whole number of bytes"),
        ("cpu=0GiB", "nothing; leave the tier out"),
        ({"cpu": 0}, "nothing; leave the tier out"),
        ("cpu=40%", "needs the model's size"),
        ("cpu=0%", "between 0% and 100%"),
        ("cpu=150%", "between 0% and 100%"),
        ("{0: '8GiB'", "not a readable dict"),
        ("{1, 2}", "is not a dict"),
        ("{[1]: '1GiB'}", "not a readable dict"),
        ([("cpu", "1GiB")], "cannot be made from list"),
        (8 * GiB, "cannot be made from int"),
    ],
)
def test_rejections_say_what_is_accepted(spec, fragment):
    with pytest.raises(BudgetError) as info:
        parse_budget(spec)
    message = str(info.value)
    assert fragment in message
    assert ACCEPTED_FORMS in message
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_max_memory_is_a_fresh_dict_each_time():
    # infer_auto_device_map rewrites the max_memory dict it gets; the budget must not change with it
    import torch

    b = parse_budget({"cpu": "1MiB", "disk": "1GiB"})
    given = b.max_memory()
    given["cpu"] = "junk"
    assert b.max_memory() == {"cpu": 2**20, "disk": GiB}
    infer_auto_device_map(torch.nn.Linear(4, 4), max_memory=b.max_memory())
    assert b.max_memory() == {"cpu": 2**20, "disk": GiB}


def test_text_form_round_trips():
    b = parse_budget({0: "8.5GiB", "cpu": "30GiB", "disk": 12345})
    assert parse_budget(str(b)) == b
    assert str(b) == "0=8.5GiB,cpu=30GiB,disk=12345"
    odd = parse_budget({"cpu": 10**9 + 7, "disk": 3 * 2**20})
    assert parse_budget(str(odd)) == odd and str(odd) == "cpu=1000000007,disk=3MiB"


def test_budget_accessors():
    b = parse_budget(METHOD_BUDGET)
    assert b[0] == b["0"] == int(8.5 * GiB)
    assert "cpu" in b and "disk" not in b and "bogus" not in b
    assert b.total == int(38.5 * GiB)
    assert parse_budget(b) is b
    assert isinstance(b, Budget)


@pytest.mark.parametrize(
    "n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (int(8.5 * GiB), "8.5 GiB"), (1536 * 2**20, "1.5 GiB")]
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_detect_hardware(tmp_path):
    import torch

    hw = detect_hardware(tmp_path / "not" / "yet")
    assert hw.ram_total_bytes >= hw.ram_available_bytes > 0
    assert hw.disk_free_bytes > 0 and hw.cpu_count >= 1
    assert len(hw.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    text = "\n".join(hw.summary() + hw.what_runs_where())
    assert "RAM" in text and "Disk" in text
    if not hw.gpus:
        assert hw.tiers() == ["cpu", "disk"] and "No GPU" in text


def test_one_tier_down():
    from helpers.budget import one_tier_down

    assert one_tier_down(METHOD_BUDGET) == {"cpu": "8.5GiB", "disk": "30GiB"}
    assert one_tier_down("0=40%,cpu=100%") == {"cpu": "40%", "disk": "100%"}
    assert one_tier_down({"cpu": "1GiB"}) == {"cpu": "1GiB"}
    for spec in ({0: "8GiB", 1: "8GiB", "cpu": "30GiB"}, {0: "8GiB", "cpu": "8GiB", "disk": "9GiB"}):
        with pytest.raises(BudgetError, match="one GPU and no disk tier"):
            one_tier_down(spec)
