"""lowbit.io (safetensors checkpoints in the native library): round trips of every dtype (bf16, empty
and 0-dim tensors included) and metadata; interop with the Python ``safetensors`` package both ways
(skipped when it is not installed: ``pip install safetensors``); malformed files -> RuntimeError
naming the file and the broken rule."""
import json
import struct

import pytest
import torch

import lowbit.io as lio

# The ten core dtypes, then the ones torch and the safetensors format also share.
CORE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
               torch.int32, torch.int64, torch.bool]
EXTRA_DTYPES = [torch.uint16, torch.uint32, torch.uint64, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2,
                torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu]
ALL_DTYPES = CORE_DTYPES + EXTRA_DTYPES


def _random(dtype, shape):
    """Random bit patterns of any dtype (NaNs included for floats: comparisons are bitwise)."""
    n = 1
    for s in shape:
        n *= s
    if dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _bits(t):
    return t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def _assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert torch.equal(_bits(a), _bits(b))


def _raw_file(header, data=b""):
    """A file from a header (dict -> JSON; str or bytes used verbatim) and data bytes, unpadded."""
    text = json.dumps(header) if isinstance(header, dict) else header
    text = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<Q", len(text)) + text + data


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_round_trip_every_dtype(tmp_path, dtype):
    tensors = {"full": _random(dtype, (3, 5)), "empty": _random(dtype, (0, 4)), "scalar": _random(dtype, ()),
               "vec": _random(dtype, (7,))}
    path = tmp_path / "t.safetensors"
    lio.save_file(tensors, path)
    loaded = lio.load_file(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].device.type == "cpu"
        _assert_same(loaded[name], t)
    assert lio.load_metadata(path) == {}


def test_round_trip_mixed_file_with_metadata(tmp_path):
    tensors = {f"layers.{i}.{d}".replace("torch.", ""): _random(d, (2, i + 1)) for i, d in enumerate(ALL_DTYPES)}
    tensors["emb.é😀 \"quoted\""] = torch.randn(4, 3, dtype=torch.bfloat16)
    meta = {"format": "pt", "note": "ünïcode 😀 \"q\" \\ \n\t", "": ""}
    path = tmp_path / "mixed.safetensors"
    lio.save_file(tensors, str(path), metadata=meta)
    assert lio.load_metadata(path) == meta
    loaded = lio.load_file(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        _assert_same(loaded[name], t)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    assert n % 8 == 0  # header padded: the data starts 8-byte aligned


def test_saves_views_and_graph_tensors(tmp_path):
    base = torch.randn(6, 8)
    c = torch.randn(3, 4, dtype=torch.complex64)
    tensors = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.randn(1, 5).expand(4, 5),
        "param": torch.nn.Parameter(torch.randn(3)),
        "grad": (torch.randn(3, requires_grad=True) * 2),
        "conj": c.conj(),
        "neg": torch.randn(2, 2, dtype=torch.complex64).conj().imag,
    }
    path = tmp_path / "views.safetensors"
    lio.save_file(tensors, path)
    loaded = lio.load_file(path)
    for name, t in tensors.items():
        _assert_same(loaded[name], t)
        assert not loaded[name].requires_grad
    assert torch.equal(loaded["conj"], c.conj().resolve_conj())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_saves_cuda_tensors(tmp_path):
    t = torch.randn(4, 4, device="cuda", dtype=torch.float16)
    lio.save_file({"w": t}, tmp_path / "cuda.safetensors")
    _assert_same(lio.load_file(tmp_path / "cuda.safetensors")["w"], t.cpu())


def test_empty_file(tmp_path):
    lio.save_file({}, tmp_path / "empty.safetensors")
    assert lio.load_file(tmp_path / "empty.safetensors") == {}
    assert (tmp_path / "empty.safetensors").read_bytes() == b"\x08" + b"\x00" * 7 + b"{}      "


def test_save_errors(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(RuntimeError, match="tensor 'z' has dtype ComplexDouble, which has no safetensors"):
        lio.save_file({"a": torch.ones(2), "z": torch.ones(2, dtype=torch.complex128)}, path)
    with pytest.raises(RuntimeError, match="tensor 'q'.*layout"):
        lio.save_file({"q": torch.eye(3).to_sparse()}, path)
    with pytest.raises(RuntimeError, match="reserved"):
        lio.save_file({"__metadata__": torch.ones(1)}, path)
    with pytest.raises(RuntimeError, match="cannot create"):
        lio.save_file({"a": torch.ones(1)}, tmp_path / "missing_dir" / "x.safetensors")
    with pytest.raises(TypeError, match="metadata"):
        lio.save_file({"a": torch.ones(1)}, path, metadata={"a": 1})
    with pytest.raises(TypeError, match="Tensor"):
        lio.save_file({"a": [1, 2]}, path)
    with pytest.raises(TypeError, match="dict"):
        lio.save_file([torch.ones(1)], path)
    assert not path.exists()  # nothing half-written


def test_load_unsupported_dtype(tmp_path):
    # F6_E2M3 is valid safetensors (4 six-bit values in 3 bytes) but has no torch dtype.
    path = tmp_path / "f6.safetensors"
    path.write_bytes(_raw_file({"x": _entry("F6_E2M3", [4], 0, 3)}, b"abc"))
    with pytest.raises(RuntimeError, match="tensor 'x' has dtype F6_E2M3, which lowbit cannot load"):
        lio.load_file(path)
    assert lio.load_metadata(path) == {}  # the header itself is valid


def test_save_is_atomic(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    lio.save_file({"a": torch.ones(2)}, path)
    with pytest.raises(RuntimeError):
        lio.save_file({"a": torch.ones(2), "b": torch.ones(2, dtype=torch.complex128)}, path)
    _assert_same(lio.load_file(path)["a"], torch.ones(2))  # the old checkpoint survives a failed save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


# ---------------------------------------------------------------------------------------------------
# Malformed files: each a RuntimeError naming the file and the rule. The reference library must reject
# them too (checked when it is installed), so the two agree on what a valid file is.
def _valid_bytes():
    return _raw_file({"__metadata__": {"k": "v"}, "a": _entry("F32", [2, 2], 0, 16), "b": _entry("I8", [3], 16, 19)},
                     bytes(range(19)))


def _set_len(b, n):
    return struct.pack("<Q", n) + b[8:]


MALFORMED = {
    "truncated data": (lambda: _valid_bytes()[:-1], "lies outside the data buffer"),
    "truncated header": (lambda: _valid_bytes()[:40], "exceeds the 32 bytes that follow"),
    "shorter than 8 bytes": (lambda: b"\x10\x00\x00", "too few for the 8-byte header length"),
    "header size beyond file": (lambda: _set_len(_valid_bytes(), 10_000), "header length 10000 exceeds"),
    "header size too large": (lambda: _set_len(_valid_bytes(), 1 << 62), "exceeds the 100 MB limit"),
    "header size too small": (lambda: _set_len(_valid_bytes(), 20), "invalid header JSON"),
    "overlapping offsets": (lambda: _raw_file({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, bytes(12)),
                            "overlaps tensor 'a'"),
    "gap between tensors": (lambda: _raw_file({"a": _entry("U8", [2], 0, 2), "b": _entry("U8", [2], 4, 6)}, bytes(6)),
                            "leaves a gap"),
    "trailing bytes": (lambda: _valid_bytes() + b"\x00", "trailing bytes belong to no tensor"),
    "wrong dtype string": (lambda: _raw_file({"a": _entry("float32", [2], 0, 8)}, bytes(8)), "unknown dtype 'float32'"),
    "size disagrees with dtype": (lambda: _raw_file({"a": _entry("F64", [2], 0, 8)}, bytes(8)),
                                  "span 8 bytes but dtype F64 with shape [2] needs 16"),
    "negative dimension": (lambda: _raw_file({"a": _entry("U8", [-1], 0, 0)}), "must be non-negative"),
    "float dimension": (lambda: _raw_file({"a": _entry("U8", [2.0], 0, 2)}, bytes(2)), "must be an integer"),
    "shape overflow": (lambda: _raw_file({"a": _entry("U8", [1 << 32, 1 << 32, 2], 0, 0)}), "overflows 64 bits"),
    "not JSON": (lambda: struct.pack("<Q", 8) + b"not json", "invalid header JSON"),
    "not an object": (lambda: _raw_file("[1, 2, 3]"), "must be a JSON object, got an array"),
    "metadata not strings": (lambda: _raw_file({"__metadata__": {"a": 1}}), "must be a string"),
    "duplicate field": (lambda: _raw_file('{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
                        "duplicate key 'dtype'"),
    "invalid UTF-8 name": (lambda: _raw_file(b'{"\xff":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
                           "invalid UTF-8 in string"),
}


def _write(tmp_path, name, data):
    path = tmp_path / (name.replace(" ", "_") + ".safetensors")
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(MALFORMED), ids=str)
def test_malformed_file(tmp_path, case):
    make, message = MALFORMED[case]
    data = make()
    path = _write(tmp_path, case, data)
    with pytest.raises(RuntimeError, match="safetensors") as info:
        lio.load_file(path)
    assert message in str(info.value), str(info.value)
    assert str(path) in str(info.value)
    with pytest.raises(RuntimeError, match="safetensors"):
        lio.load_metadata(path)
    try:
        import safetensors.torch as st
    except ImportError:
        return
    with pytest.raises(Exception):
        st.load(data)


def test_bool_bytes_must_be_0_or_1(tmp_path):
    path = _write(tmp_path, "bool", _raw_file({"m": _entry("BOOL", [3], 0, 3)}, b"\x00\x01\x02"))
    with pytest.raises(RuntimeError, match="tensor 'm' \\(BOOL\\) holds the byte value 2"):
        lio.load_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(RuntimeError, match="cannot open"):
        lio.load_file(tmp_path / "nope.safetensors")


def test_valid_hand_written_file(tmp_path):
    # Keys in any order, entries out of offset order, escapes, whitespace, an unpadded header.
    hdr = ('  {"b" : {"shape":[2], "data_offsets":[8,10], "dtype":"U8"},\n'
           ' "\\u0061\\ud83d\\ude00":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}, "__metadata__":{"x":"y"}}')
    data = struct.pack("<2f", 1.5, -2.0) + b"\x07\x09"
    path = _write(tmp_path, "hand", _raw_file(hdr, data))
    loaded = lio.load_file(path)
    assert list(loaded) == ["a😀", "b"]  # file (offset) order
    assert torch.equal(loaded["a😀"], torch.tensor([1.5, -2.0]))
    assert torch.equal(loaded["b"], torch.tensor([7, 9], dtype=torch.uint8))
    assert lio.load_metadata(path) == {"x": "y"}


# ---------------------------------------------------------------------------------------------------
# Interop with the reference implementation.
def _interop_dtypes():
    return CORE_DTYPES + EXTRA_DTYPES


def test_lowbit_writes_safetensors_reads(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    tensors = {f"t{i}": _random(d, (3, 2)) for i, d in enumerate(_interop_dtypes())}
    tensors.update(empty=torch.empty(0, 5, dtype=torch.bfloat16), scalar=torch.tensor(3.5, dtype=torch.float64))
    meta = {"format": "pt", "ü": "😀"}
    path = tmp_path / "lowbit.safetensors"
    lio.save_file(tensors, path, metadata=meta)
    loaded = st.load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        _assert_same(loaded[name], t)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta


def test_safetensors_writes_lowbit_reads(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {f"t{i}": _random(d, (2, 3)) for i, d in enumerate(_interop_dtypes())}
    tensors.update(empty=torch.empty(0, dtype=torch.int64), scalar=torch.tensor(True))
    meta = {"format": "pt", "step": "100"}
    path = tmp_path / "ref.safetensors"
    st.save_file(tensors, str(path), metadata=meta)
    loaded = lio.load_file(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        _assert_same(loaded[name], t)
    assert lio.load_metadata(path) == meta


def test_same_bytes_as_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {f"w{i}": _random(d, (i % 3 + 1, 2)) for i, d in enumerate(_interop_dtypes())}
    tensors.update(z=torch.empty(0, 2), a=torch.tensor(1.0, dtype=torch.float16))
    lio.save_file(tensors, tmp_path / "a.safetensors")
    st.save_file(tensors, str(tmp_path / "b.safetensors"))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    # With one metadata entry the layout is deterministic in both libraries too.
    lio.save_file(tensors, tmp_path / "c.safetensors", metadata={"k": "v"})
    st.save_file(tensors, str(tmp_path / "d.safetensors"), metadata={"k": "v"})
    assert (tmp_path / "c.safetensors").read_bytes() == (tmp_path / "d.safetensors").read_bytes()
