"""Releases: exact round trip (float64 references bit for bit), refusal of pickles, of edited or
newer files and of registry entries whose checksum does not match; `mlfound show`."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlfound import release as release_module
from mlfound.cli import main as mlfound
from mlfound.data.files import sha256_file
from mlfound.data.readers import SourceSpec, read_source
from mlfound.predict import predict
from mlfound.release import INTEGRITY_KEY, ReleaseError, content_hashes, load, release_metadata, save_release
from tests.model.test_potential import TASKS, make_potential

LOTS = {"gfn2_xtb": {"lot_method": "GFN2-xTB", "lot_code": "tblite"},
        "hf_sto3g": {"lot_method": "HF", "lot_basis": "STO-3G", "lot_code": "pyscf"}}


@pytest.fixture(scope="module")
def records(demo_dir):
    return list(read_source(SourceSpec(demo_dir / "gfn2_xtb.extxyz", task="gfn2_xtb")))[:12]


@pytest.fixture
def release_path(tmp_path):
    model = make_potential(seed=1)
    with torch.no_grad():  # references no float32 could hold exactly
        model.references_ev[1, 2] = -2030.123456789012345
    metadata = release_metadata(model, {t: {"lot": LOTS[t]} for t in TASKS})
    return save_release(model, metadata, tmp_path / "m.safetensors")


def test_round_trip_is_exact(release_path, records):
    original = make_potential(seed=1)
    with torch.no_grad():
        original.references_ev[1, 2] = -2030.123456789012345
    loaded = load(release_path)
    assert loaded.heads == TASKS and loaded.metadata["heads"]["hf_sto3g"]["lot"]["lot_basis"] == "STO-3G"
    assert loaded.model.references_ev.dtype == torch.float64
    assert torch.equal(loaded.model.references_ev, original.references_ev)
    assert loaded.metadata["heads"]["hf_sto3g"]["references_ev"]["7"] == -2030.123456789012345
    for head in TASKS:
        e0, f0 = predict(original, records, head)
        e1, f1 = predict(loaded.model, records, head)
        assert (e0 == e1).all() and all((a == b).all() for a, b in zip(f0, f1))



def test_a_many_body_model_round_trips_exactly(tmp_path, records):
    """The product-basis trunk (correlation 3) is rebuilt from the header's model config alone."""
    model = make_potential(seed=2, correlation=3)
    loaded = load(save_release(model, release_metadata(model, {}), tmp_path / "mace_like.safetensors"))
    assert loaded.model.config.correlation == 3
    e0, f0 = predict(model, records, "gfn2_xtb")
    e1, f1 = predict(loaded.model, records, "gfn2_xtb")
    assert (e0 == e1).all() and all((a == b).all() for a, b in zip(f0, f1))

@pytest.mark.faults
def test_a_pickled_torch_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(make_potential().state_dict(), path)
    with pytest.raises(ReleaseError, match="pickled torch file.*mlfound export"):
        load(path)


def test_metadata_that_disagrees_with_the_weights_is_refused(release_path, tmp_path):
    """Even with content hashes that match (a writer's bug, not corruption), the two halves must agree."""
    header = json.loads(_header(release_path))
    header["heads"]["gfn2_xtb"]["references_ev"]["1"] += 1e-9
    edited = tmp_path / "edited.safetensors"
    tensors = load_file(release_path)
    save_file(tensors, edited, metadata={"mlfound": json.dumps(header),
                                         INTEGRITY_KEY: json.dumps(content_hashes(tensors, header))})
    with pytest.raises(ReleaseError, match="references_ev in the metadata and in the weights differ"):
        load(edited)


def test_a_newer_format_is_refused_with_advice(release_path, tmp_path):
    header = json.loads(_header(release_path))
    header["format_version"] = 99
    newer = tmp_path / "newer.safetensors"
    save_file(load_file(release_path), newer, metadata={"mlfound": json.dumps(header)})
    with pytest.raises(ReleaseError, match="format 99.*upgrade mlfound"):
        load(newer)


@pytest.mark.faults
@pytest.mark.parametrize("low_byte", [0x80, 0x50])
def test_a_release_whose_header_length_looks_like_a_pickle_or_zip_loads(low_byte, tmp_path, records):
    """A safetensors file starts with its header length (u64 LE): 0x80 is also pickle's PROTO opcode and
    0x50 ('P') the start of a zip; the framing, not the first byte, decides."""
    model = make_potential(seed=1)
    for pad in range(400):
        path = save_release(model, release_metadata(model, {}, training={"pad": "x" * pad}), tmp_path / "m.safetensors")
        if path.read_bytes()[0] == low_byte:
            break
    assert path.read_bytes()[0] == low_byte
    loaded = load(path)
    assert (predict(loaded.model, records, "gfn2_xtb")[0] == predict(model, records, "gfn2_xtb")[0]).all()
    assert mlfound(["show", str(path)]) == 0


@pytest.mark.faults
def test_a_flipped_bit_in_a_tensor_is_refused_naming_the_tensor(release_path, tmp_path, capsys):
    data = bytearray(release_path.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    data[8 + header_length + 100] ^= 0x04  # one bit of the weights
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match="content differs from the hashes written at export: tensor '.*"
                                           "mlfound export RUN_DIR"):
        load(flipped)
    assert mlfound(["show", str(flipped)]) == 2
    assert "content differs" in capsys.readouterr().err


@pytest.mark.faults
@pytest.mark.parametrize("edit, part", [
    (lambda h: h["model_config"].update(cutoff_a=h["model_config"]["cutoff_a"] + 1.0), "model_config"),
    (lambda h: h["heads"]["hf_sto3g"].update(scale_ev=2 * h["heads"]["hf_sto3g"]["scale_ev"]), "heads"),
])
def test_edited_metadata_is_refused_naming_the_entry(release_path, tmp_path, capsys, edit, part):
    header = json.loads(_header(release_path))
    edit(header)
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(release_path), edited, metadata={"mlfound": json.dumps(header),
                                                         INTEGRITY_KEY: _header(release_path, INTEGRITY_KEY)})
    with pytest.raises(ReleaseError, match=f"differs from the hashes written at export: metadata '{part}'"):
        load(edited)
    assert mlfound(["show", str(edited)]) == 2
    assert f"metadata '{part}'" in capsys.readouterr().err


@pytest.mark.faults
def test_a_release_without_its_hashes_is_refused(release_path, tmp_path):
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(release_path), stripped, metadata={"mlfound": _header(release_path)})
    with pytest.raises(ReleaseError, match="content hashes .* are missing"):
        load(stripped)


def test_registry_names_resolve_and_checksums_are_enforced(release_path, tmp_path, monkeypatch):
    monkeypatch.setattr(release_module, "REGISTRY_DIR", tmp_path)
    entry = {"file": release_path.name, "sha256": sha256_file(release_path), "lots": TASKS}
    (tmp_path / "registry.json").write_text(json.dumps({"tiny": entry}))
    assert load("tiny").heads == TASKS
    with pytest.raises(ReleaseError, match="no model of that name.*known: \\['tiny'\\]"):
        load("nonexistent")
    release_path.write_bytes(release_path.read_bytes() + b" ")
    with pytest.raises(ReleaseError, match="sha256 .* does not match"):
        load("tiny")


def test_show_lists_heads_lots_and_sizes(release_path, capsys):
    assert mlfound(["show", str(release_path)]) == 0
    out = capsys.readouterr().out
    assert "GFN2-xTB (tblite)" in out and "HF/STO-3G (pyscf)" in out and "parameters" in out
    assert mlfound(["show", str(release_path.with_name("missing.safetensors"))]) == 2


def _header(path, key: str = "mlfound") -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()[key]


def test_a_head_never_trained_on_an_element_refuses_it(tmp_path, demo_dir):
    """No silent zero reference: a head whose data lacked nitrogen gives an error, not a wrong energy."""
    from mlfound.model import Potential
    from tests.model.test_potential import CONFIG

    model = Potential(CONFIG, [1, 6, 7, 8], ["no_n"], {"no_n": {1: -13.6, 6: -1030.0, 8: -2040.0}}, {"no_n": 1.0})
    path = save_release(model, release_metadata(model, {}), tmp_path / "no_n.safetensors")
    loaded = load(path)
    assert loaded.metadata["heads"]["no_n"]["references_ev"] == {"1": -13.6, "6": -1030.0, "8": -2040.0}
    records = list(read_source(SourceSpec(demo_dir / "gfn2_xtb.extxyz", task="gfn2_xtb")))
    with_n = [r for r in records if 7 in r.z][:1]
    without_n = [r for r in records if 7 not in r.z][:1]
    assert predict(loaded.model, without_n, "no_n")[0].shape == (1,)
    with pytest.raises(ValueError, match=r"head 'no_n' has no reference energy for elements \[7\]"):
        predict(loaded.model, with_n, "no_n")


def test_a_format_1_release_still_loads_and_predicts_the_same(tmp_path, records):
    """Format 1 predates scalar_last_layer and radial_layers (and formats <= 4 a counted avg_num_neighbors);
    it must load as the architecture it was."""
    from mlfound.model import Potential
    from tests.model.test_potential import CONFIG

    old_config = CONFIG.model_copy(update={"scalar_last_layer": False, "radial_layers": 2})
    refs = {"gfn2_xtb": {1: -10.0, 6: -48.0, 7: -71.0, 8: -103.0}}
    old = Potential(old_config, [1, 6, 7, 8], ["gfn2_xtb"], refs, {"gfn2_xtb": 0.5})
    path = save_release(old, release_metadata(old, {}), tmp_path / "v2.safetensors")
    header = json.loads(_header(path))
    header["format_version"] = 1
    for key in ("scalar_last_layer", "radial_layers", "avg_num_neighbors"):
        del header["model_config"][key]
    save_file(load_file(path), tmp_path / "v1.safetensors", metadata={"mlfound": json.dumps(header)})
    with pytest.warns(UserWarning, match="format 1 has no content hashes"):
        loaded = load(tmp_path / "v1.safetensors")
    assert not loaded.verified
    assert loaded.metadata["format_version"] == release_module.FORMAT_VERSION
    assert not loaded.model.config.scalar_last_layer and loaded.model.config.avg_num_neighbors == 10.0
    assert (predict(loaded.model, records, "gfn2_xtb")[0] == predict(old, records, "gfn2_xtb")[0]).all()
    with pytest.warns(UserWarning, match="format 1 has no content hashes"):
        assert mlfound(["export", str(tmp_path / "v1.safetensors"), "--out", str(tmp_path / "v3.safetensors")]) == 0
    rewritten = load(tmp_path / "v3.safetensors")  # no warning: hashed now
    assert rewritten.verified
    assert (predict(rewritten.model, records, "gfn2_xtb")[0] == predict(old, records, "gfn2_xtb")[0]).all()


def test_a_format_3_release_with_the_product_basis_loads_as_the_trunk_it_was(capsys):
    """Format 3 predates product_messages_all_l: its product-basis trunk's last layer had messages of scalars
    only. The shipped default release is such a file; a strict load checks every tensor's shape."""
    path = release_module.REGISTRY_DIR / "e2-reptile-k5.safetensors"
    assert json.loads(_header(path))["format_version"] == 3
    loaded = load(path)
    assert loaded.verified and loaded.metadata["format_version"] == release_module.FORMAT_VERSION
    assert loaded.model.config.correlation == 3 and not loaded.model.config.product_messages_all_l
    assert mlfound(["show", str(path)]) == 0
    assert f"format 3, read as {release_module.FORMAT_VERSION}," in capsys.readouterr().out


@pytest.mark.faults
def test_non_finite_weights_are_never_written_nor_loaded(release_path, tmp_path):
    """A diverged model is refused by save_release (so by export and fine-tuning alike) and by load, even when
    its file is otherwise intact (hashes recomputed over the NaN)."""
    model = load(release_path).model
    with torch.no_grad():
        next(model.trunk.parameters())[0] = float("nan")
    out = tmp_path / "nan.safetensors"
    with pytest.raises(ReleaseError, match=r"refusing to write .*nan.safetensors: parameters \['trunk\..*'\] hold "
                                           "NaN or inf"):
        save_release(model, load(release_path).metadata, out)
    assert not out.exists()
    tensors = {name: value.contiguous() for name, value in model.state_dict().items()}
    header = json.loads(_header(release_path))
    save_file(tensors, out, metadata={"mlfound": json.dumps(header),
                                      INTEGRITY_KEY: json.dumps(content_hashes(tensors, header), sort_keys=True)})
    with pytest.raises(ReleaseError, match=r"parameters \['trunk\..*'\] hold NaN or inf; the model is from a "
                                           "diverged run"):
        load(out)


@pytest.mark.faults
@pytest.mark.parametrize("content, message", [('{"default": {"file": "m.safe', "is not readable JSON"),
                                              ('{"m": "m.safetensors"}', "every entry must map a name to its file")])
def test_a_damaged_registry_is_named(monkeypatch, tmp_path, capsys, content, message):
    monkeypatch.setattr(release_module, "REGISTRY_DIR", tmp_path)
    (tmp_path / "registry.json").write_text(content)
    assert mlfound(["show", "m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'registry.json'}") and message in err and err.count("\n") == 1


@pytest.mark.faults
def test_no_command_writes_over_the_model_or_data_it_reads(release_path, tmp_path, capsys, demo_dir):
    """export, deploy, split, evaluate --json: an output that is an input is refused before any work."""
    from mlfound.data.files import sha256_file

    data = tmp_path / "train.extxyz"
    data.write_bytes((demo_dir / "gfn2_xtb.extxyz").read_bytes())
    before = {p: sha256_file(p) for p in (release_path, data)}
    for args in (["export", str(release_path), "--out", str(release_path)],
                 ["deploy", str(release_path), "--head", "gfn2_xtb", "--out", str(release_path)],
                 ["split", str(data), "--out", str(tmp_path), "--sizes", "train=5", "test=rest"],
                 ["evaluate", str(release_path), str(data), "--head", "gfn2_xtb", "--json", str(data)]):
        assert mlfound(args) == 2, args
        assert "refusing to overwrite it" in capsys.readouterr().err
    assert before == {p: sha256_file(p) for p in (release_path, data)}


@pytest.mark.faults
def test_two_registry_updates_at_once_do_not_lose_one(release_path, tmp_path, monkeypatch):
    """Registering reads, changes and writes registry.json: while another update holds the registry, it waits
    for no one and is refused naming the holder (never a silently lost entry)."""
    from mlfound.data.files import FolderInUseError, FolderLock

    monkeypatch.setattr(release_module, "REGISTRY_DIR", tmp_path)
    model = tmp_path / "m.safetensors"
    model.write_bytes(release_path.read_bytes())
    with FolderLock(tmp_path, "registry update"), pytest.raises(FolderInUseError, match="registry update"):
        release_module.register("m", model)
    assert release_module.register("m", model)["file"] == "m.safetensors"
    assert not (tmp_path / FolderLock.NAME).exists()
