"""The code tables compiled into the kernels are bit-identical to the spec's data files."""
import json
import struct

import pytest
import torch

from qlora_ext.functional import get_code

from conftest import SHARED


@pytest.mark.parametrize("name,file", [("nf4", "nf4_code.json"), ("fp4", "fp4_code.json"),
                                       ("dynamic_signed", "dynamic_map_signed.json"),
                                       ("dynamic_unsigned", "dynamic_map_unsigned.json")])
def test_table_bits_match_data(name, file):
    data = json.loads((SHARED / "data" / file).read_text())
    expected = [struct.unpack(">I", bytes.fromhex(h))[0] for h in data["float32_hex"]]
    got = get_code(name).view(torch.int32).tolist()
    assert [g & 0xFFFFFFFF for g in got] == expected


def test_nf4_code_properties():
    c = get_code("nf4")
    assert c[7].item() == 0.0 and c[0].item() == -1.0 and c[15].item() == 1.0
    assert torch.all(c[1:] > c[:-1])


def test_unknown_table_is_an_error():
    with pytest.raises(RuntimeError, match="unknown code table"):
        get_code("int4")
