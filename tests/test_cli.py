"""The ``repc`` command line (repc/cli.py): ``repc fuse`` and ``repc inspect``.

Subprocess tests run the real command (the ``repc`` script and ``python -m repc``); the many
bad-input cases call ``repc.cli.main`` in-process, which is what the script runs, to keep the
file fast.  The fused file is loaded in a fresh interpreter where repc cannot be imported.
"""

import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import repc
import repc.api
from repc import cli
from repc.examples import RepVGGBlock, example_net, randomize_bn

ROOT = pathlib.Path(__file__).resolve().parents[1]
FACTORY_MODULE = "repc_cli_test_models"

FACTORIES = '''
import torch.nn as nn
from repc.examples import RepVGGBlock, randomize_bn


def build(c=4):
    return randomize_bn(nn.Sequential(RepVGGBlock(c, c)), seed=1)


def broken(c=4):
    raise ValueError("no such width")


def not_a_model():
    return 3


NOT_CALLABLE = 5


class Pair(nn.Module):
    """Two inputs: a linear-BN chain on each, summed."""

    def __init__(self, d=8):
        super().__init__()
        self.left = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d))
        self.right = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d))

    def forward(self, a, b):
        return self.left(a) + self.right(b)


def pair(d=8):
    return randomize_bn(Pair(d), seed=2)


class Tokens(nn.Module):
    """Token ids through an embedding, a masked mean over the sequence, a linear-BN chain."""

    def __init__(self, vocab=50, d=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.head = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d))

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head(h.mean(1))


def tokens(vocab=50, d=8):
    return randomize_bn(Tokens(vocab, d), seed=3)
'''


def tiny(c=4, seed=0):
    return randomize_bn(nn.Sequential(RepVGGBlock(c, c)), seed=seed).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a factory module and checkpoints of every kind, good and bad."""
    d = tmp_path_factory.mktemp("cli")
    (d / f"{FACTORY_MODULE}.py").write_text(FACTORIES)
    torch.manual_seed(0)
    model = tiny()
    torch.save(model, d / "model.pt")
    torch.save(tiny().train(), d / "training.pt")
    torch.save(model.state_dict(), d / "weights.pt")
    good = (d / "weights.pt").read_bytes()
    (d / "truncated.pt").write_bytes(good[: len(good) // 2])
    (d / "garbage.pt").write_bytes(b"this is not a checkpoint at all")
    (d / "empty.pt").write_bytes(b"")
    torch.save([1, 2, 3], d / "list.pt")
    torch.save(torch.randn(3), d / "tensor.pt")
    write_safetensors(d / "weights.safetensors", model.state_dict())
    st = (d / "weights.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(st[: len(st) - 40])
    (d / "badheader.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json at all....")
    (d / "a_folder").mkdir()
    return d


def write_safetensors(path, tensors):
    """A state dict written by the safetensors package."""
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def run_cli(capsys, *argv):
    """``repc.cli.main`` in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def run_process(*argv, cwd, script=False):
    command = [str(pathlib.Path(sys.executable).parent / "repc")] if script else [sys.executable, "-m", "repc"]
    return subprocess.run(command + [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=300)


def repc_free_site(tmp_path):
    """A folder of links to every entry of site-packages except repc's own (package, metadata,
    editable-install hooks): with ``python -S`` and only this folder on sys.path, repc is gone."""
    site = pathlib.Path(torch.__file__).resolve().parents[1]
    free = tmp_path / "site_without_repc"
    free.mkdir()
    for entry in site.iterdir():
        if entry.name == "repc" or entry.name.startswith("repc-") or "repc" in entry.name and "editable" in entry.name:
            continue
        (free / entry.name).symlink_to(entry)
    return free


CHILD = '''
import importlib.util, sys
sys.path.append({site!r})
if importlib.util.find_spec("repc") is not None:
    raise SystemExit("repc is importable in the child: the test would prove nothing")
import torch
fused = torch.load({fused!r}, weights_only=False)
program = torch.export.load({exported!r})
x_big, x_tiny = torch.load({inputs!r})
with torch.no_grad():
    torch.save({{"fused": fused(x_big), "exported": program.module()(x_tiny), "class": type(fused).__name__,
                "report_keys": sorted(fused.repc_report), "repc_loaded": "repc" in sys.modules}}, {outputs!r})
'''


def test_fused_files_load_and_run_where_repc_cannot_be_imported(work, tmp_path):
    fused, exported, report = tmp_path / "fused.pt", tmp_path / "tiny.pt2", tmp_path / "report.json"
    done = run_process("fuse", "--example", "--example-input", "1x3x16x16", "-o", fused, "--report", report,
                       "--no-benchmark", cwd=tmp_path, script=True)
    assert done.returncode == 0, done.stderr
    assert "region(s) fused" in done.stdout and "verification passed" in done.stdout
    assert "repc: compiling" in done.stderr  # progress goes to stderr
    done = run_process("fuse", work / "model.pt", "--trust-pickle", "--example-input", "1x4x8x8", "--format", "export",
                       "-o", exported, "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # -q: no progress

    # another batch and size for both: the export program keeps the dynamic axes
    x_big, x_tiny = torch.randn(3, 3, 40, 40), torch.randn(3, 4, 11, 9)
    torch.save((x_big, x_tiny), tmp_path / "inputs.pt")
    code = CHILD.format(site=str(repc_free_site(tmp_path)), fused=str(fused), exported=str(exported),
                        inputs=str(tmp_path / "inputs.pt"), outputs=str(tmp_path / "outputs.pt"))
    child = subprocess.run([sys.executable, "-S", "-E", "-s", "-c", code], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    got = torch.load(tmp_path / "outputs.pt")
    assert not got["repc_loaded"] and got["class"] != "ExampleNet"
    with torch.no_grad():
        assert torch.allclose(got["fused"], example_net()(x_big), atol=1e-5, rtol=1e-4)
        assert torch.allclose(got["exported"], torch.load(work / "model.pt", weights_only=False)(x_tiny), atol=1e-5)
    doc = json.loads(report.read_text())
    assert doc["written"] and doc["output"] == str(fused) and doc["example_inputs"][0]["shape"] == [1, 3, 16, 16]
    assert len(doc["report"]["rewrites"]) >= 5 and doc["report"]["verification"]["ok"]
    assert set(got["report_keys"]) >= {"rewrites", "verification"}  # the report travels as a plain dict


def test_inspect_prints_regions_and_writes_nothing(work, tmp_path):
    before = sorted(p.name for p in work.iterdir())
    done = run_process("inspect", work / "model.pt", "--trust-pickle", "--example-input", "1x4x8x8", "--no-benchmark",
                       cwd=work)
    assert done.returncode == 0, done.stderr
    assert "nothing is written" in done.stdout
    assert "1 fusable region(s)" in done.stdout
    assert "becomes:  Conv2d(4->4, k=3x3" in done.stdout and "0.dense.1 (BatchNorm2d)" in done.stdout
    assert "parameters   184 -> 148" in done.stdout
    assert sorted(p.name for p in work.iterdir()) == before


def test_bad_input_in_a_real_process_is_one_line_and_no_traceback(tmp_path):
    done = run_process("fuse", "missing.pt", "-o", "out.pt", "--example-input", "1x3x8x8", cwd=tmp_path)
    assert done.returncode == cli.EXIT_BAD_INPUT
    assert done.stderr.splitlines() == ["repc: error: input file not found: missing.pt"]
    assert not (tmp_path / "out.pt").exists()


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "fuse", tmp_path / "missing.pt", "-o", tmp_path / "o.pt", "--debug")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("repc: error:")


def test_help_documents_the_exit_codes(capsys):
    for argv in (["--help"], ["fuse", "--help"], ["inspect", "--help"]):
        code, out, _ = run_cli(capsys, *argv)
        assert code == 0
        assert "exit codes:" in out and "0  success" in out and "2  bad input" in out and "3  verification failed" in out


BAD_INPUTS = [
    # (argv after "fuse", with {w} the work folder; words the message must contain)
    ("{w}/nope.pt", "input file not found"),
    ("{w}/a_folder", "is a directory"),
    ("{w}/empty.pt", "is empty"),
    ("{w}/truncated.pt", "truncated, corrupt or not a PyTorch checkpoint"),
    ("{w}/garbage.pt", "truncated, corrupt or not a PyTorch checkpoint"),
    ("{w}/truncated.safetensors --model {m}:build", "truncated"),
    ("{w}/badheader.safetensors --model {m}:build", "not JSON"),
    ("{w}/list.pt", "holds a list, not an nn.Module or a state dict"),
    ("{w}/tensor.pt", "holds a Tensor, not an nn.Module or a state dict"),
    ("{w}/model.pt", "pass --trust-pickle"),
    ("{w}/training.pt --trust-pickle", "training mode"),
    ("{w}/weights.pt", "give --model package.module:factory"),
    ("{w}/model.pt --trust-pickle --model {m}:build", "holds a whole model"),
    ("{w}/weights.pt --model no_such_package.nets:build", "cannot import module 'no_such_package.nets'"),
    ("{w}/weights.pt --model {m}:nope", "unknown factory"),
    ("{w}/weights.pt --model {m}", "expected package.module:factory"),
    ("{w}/weights.pt --model {m}:NOT_CALLABLE", "not a callable"),
    ("{w}/weights.pt --model {m}:broken", "ValueError: no such width"),
    ("{w}/weights.pt --model {m}:not_a_model", "returned a value of type int, not an nn.Module"),
    ("{w}/weights.pt --model {m}:build --model-kwargs {{\"c\":8}}", "does not fit the model"),
    ("{w}/weights.pt --model {m}:build --model-kwargs {{c:8}}", "not valid JSON"),
    ("{w}/weights.pt --model {m}:build --model-kwargs [8]", "expected a JSON object"),
    ("{w}/weights.pt --model-kwargs {{}}", "--model-kwargs needs --model"),
    ("{w}/model.pt --trust-pickle --example-input 1xfoo", "bad --example-input '1xfoo'"),
    ("{w}/model.pt --trust-pickle --example-input 1x0x8", "must be positive"),
    ("{w}/model.pt --trust-pickle --example-input 1,4,8,8", "bad --example-input"),
    ("{w}/model.pt --trust-pickle --example-input=", "bad --example-input"),
    ("{w}/model.pt --trust-pickle --example-input 1x3x8x8", "fails on the example input"),
    ("{w}/model.pt --trust-pickle NOSHAPE", "give --example-input"),
    ("--example {w}/model.pt", "either --example or IN"),
    ("NOINPUT", "no model given"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[a.split()[0].split("/")[-1] + ":" + m[:24]
                                                           for a, m in BAD_INPUTS])
def test_bad_input_is_one_clear_line(work, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(work)  # the factory module lives here, as a user's own code would
    args = argv.format(w=work, m=FACTORY_MODULE).split()
    shape = [] if "NOSHAPE" in args or any(a.startswith("--example-input") for a in args) else ["--example-input",
                                                                                                "1x4x8x8"]
    args = [a for a in args if a not in ("NOSHAPE", "NOINPUT")]
    out = work / "out.pt"
    code, _, err = run_cli(capsys, "fuse", *args, *shape, "-o", out, "-q")
    assert code == cli.EXIT_BAD_INPUT, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("repc: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_pickle_refusal_explains_why_and_names_the_code(work, capsys):
    code, _, err = run_cli(capsys, "inspect", work / "model.pt", "--example-input", "1x4x8x8")
    assert code == 2
    assert "runs that code" in err and "--trust-pickle" in err and "state_dict" in err and "--model" in err
    assert err.index("repc.examples.RepVGGBlock") < err.index("torch.nn.")  # the user's own class comes first


@pytest.mark.parametrize("argv, message", [
    ("-o {w}/model.pt", "is the input file"),
    ("-o {w}/list.pt", "already exists: pass --force"),
    ("-o {w}/no_such_folder/out.pt", "does not exist"),
    ("-o {w}/a_folder", "is a directory"),
    ("-o {w}/out.pt --report {w}/out.pt", "same file"),
    ("-o {w}/out.pt --report {w}/model.pt --force", "is the input file"),
    ("-o {w}/out.pt --report {w}/list.pt", "already exists"),
])
def test_output_paths_are_checked_before_any_work(work, capsys, argv, message):
    listing = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    code, _, err = run_cli(capsys, "fuse", work / "model.pt", "--trust-pickle", "--example-input", "1x4x8x8",
                           *argv.format(w=work).split())
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == listing  # nothing written or touched


def test_training_mode_model_fuses_with_eval_flag(work, tmp_path, capsys):
    out = tmp_path / "fused.pt"
    code, stdout, err = run_cli(capsys, "fuse", work / "training.pt", "--trust-pickle", "--eval", "--example-input",
                                "1x4x8x8", "-o", out, "--no-benchmark", "-q")
    assert code == 0, err
    original = torch.load(work / "training.pt", weights_only=False).eval()
    fused = torch.load(out, weights_only=False)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fused(x), original(x), atol=1e-5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 0


@pytest.mark.parametrize("weights", ["weights.safetensors", "weights.pt"])
def test_state_dict_with_factory_and_kwargs(work, tmp_path, capsys, monkeypatch, weights):
    monkeypatch.chdir(work)
    wide = tiny(c=6, seed=3)
    if weights.endswith(".safetensors"):
        write_safetensors(tmp_path / weights, wide.state_dict())
    else:
        torch.save(wide.state_dict(), tmp_path / weights)
    out, report = tmp_path / "fused.pt", tmp_path / "report.json"
    code, stdout, err = run_cli(capsys, "fuse", tmp_path / weights, "--model", f"{FACTORY_MODULE}:build",
                                "--model-kwargs", '{"c": 6}', "--example-input", "2x6x8x8", "-o", out,
                                "--report", report, "-q")
    assert code == 0, err
    assert "1 region(s) fused" in stdout and "latency" in stdout and "FLOPs" in stdout
    fused = torch.load(out, weights_only=False)
    x = torch.randn(1, 6, 10, 10)
    with torch.no_grad():
        assert torch.allclose(fused(x), wide(x), atol=1e-5)  # the weights really came from the file
    doc = json.loads(report.read_text())
    assert doc["model"] == f"{FACTORY_MODULE}:build" and doc["gains"]["latency_ms_after"] > 0
    assert doc["gains"]["flops_after"] < doc["gains"]["flops_before"]
    assert fused.repc_report == doc["report"]


def test_safetensors_reader_reads_a_file_written_by_the_safetensors_library(tmp_path):
    # bytes produced by safetensors 0.8.0: save({"weight": [[1.5, -2], [0.25, 3]] f32,
    # "steps": [7, -1] i64, "half": [0.5] bf16}, metadata={"format": "pt"})
    data = (b'\xd8\x00\x00\x00\x00\x00\x00\x00{"__metadata__":{"format":"pt"},"steps":{"dtype":"I64","shape":[2],'
            b'"data_offsets":[0,16]},"weight":{"dtype":"F32","shape":[2,2],"data_offsets":[16,32]},"half":{"dtype":'
            b'"BF16","shape":[1],"data_offsets":[32,34]}}     \x07\x00\x00\x00\x00\x00\x00\x00\xff\xff\xff\xff\xff'
            b'\xff\xff\xff\x00\x00\xc0?\x00\x00\x00\xc0\x00\x00\x80>\x00\x00@@\x00?')
    path = tmp_path / "lib.safetensors"
    path.write_bytes(data)
    tensors = cli.read_safetensors(str(path))
    assert set(tensors) == {"weight", "steps", "half"}
    assert torch.equal(tensors["weight"], torch.tensor([[1.5, -2.0], [0.25, 3.0]]))
    assert torch.equal(tensors["steps"], torch.tensor([7, -1]))
    assert tensors["half"].dtype == torch.bfloat16 and tensors["half"].item() == 0.5
    with pytest.raises(cli.CliError, match="truncated"):
        path.write_bytes(data[:-1])
        cli.read_safetensors(str(path))


def _impossible_tolerance(compare):
    def strict(fused, reference, example_inputs, tolerance=None, *rest, **kw):
        return compare(fused, reference, example_inputs, 1e-30, *rest, **kw)
    return strict


def test_force_overwrites_and_a_failed_run_keeps_the_old_file(work, tmp_path, capsys, monkeypatch):
    out = tmp_path / "fused.pt"
    out.write_bytes(b"previous result")
    base = ["fuse", work / "model.pt", "--trust-pickle", "--example-input", "1x4x8x8", "-o", out, "-q", "--no-benchmark"]
    code, _, err = run_cli(capsys, *base)
    assert code == 2 and "--force" in err and out.read_bytes() == b"previous result"
    # verification cannot pass at a tolerance of 1e-30 (which repc.compile itself refuses as below the
    # rounding of float32, so it is given to the whole-model check directly): exit 3, the old file
    # stays, no temporary file is left
    monkeypatch.setattr(repc.api, "compare", _impossible_tolerance(repc.api.compare))
    code, stdout, err = run_cli(capsys, *base, "--force")
    assert code == cli.EXIT_VERIFICATION and "verification failed" in err and "nothing written" in err
    assert "rolled back" in stdout
    assert out.read_bytes() == b"previous result" and sorted(p.name for p in tmp_path.iterdir()) == ["fused.pt"]
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *base, "--force")
    assert code == 0, err
    assert isinstance(torch.load(out, weights_only=False), torch.fx.GraphModule)


def test_a_write_that_fails_midway_leaves_no_partial_file(work, tmp_path, capsys, monkeypatch):
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli.os, "fsync", disk_full)  # fails after the bytes went into the temporary file
    out = tmp_path / "fused.pt"
    base = ["fuse", work / "model.pt", "--trust-pickle", "--example-input", "1x4x8x8", "-o", out, "-q", "--no-benchmark"]
    code, _, err = run_cli(capsys, *base)
    assert code == cli.EXIT_INTERNAL and "cannot write" in err and "No space left" in err
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"previous result")
    code, _, err = run_cli(capsys, *base, "--force")
    assert code == cli.EXIT_INTERNAL
    assert out.read_bytes() == b"previous result" and [p.name for p in tmp_path.iterdir()] == ["fused.pt"]


def test_saved_copy_drops_repc_objects_and_leaves_the_fused_module_alone():
    import repc

    fused = repc.compile(tiny(), torch.randn(1, 4, 8, 8))
    report_dict = json.loads(fused.repc_report.to_json())
    saved = cli.portable_copy(fused, report_dict)
    assert isinstance(fused.repc_report, repc.Report)  # the original keeps its report object
    assert saved.repc_report == report_dict
    import io
    buf = io.BytesIO()
    torch.save(saved, buf, pickle_protocol=2)
    assert cli.repc_references(buf.getvalue()) == []
    buf = io.BytesIO()
    torch.save(fused, buf, pickle_protocol=2)  # with the Report object: needs repc to load
    assert "repc.report.Report" in cli.repc_references(buf.getvalue())
    buf = io.BytesIO()
    torch.save(RepVGGBlock(4, 4), buf, pickle_protocol=2)
    assert "repc.examples.RepVGGBlock" in cli.repc_references(buf.getvalue())


@pytest.mark.parametrize("text, shape", [("1x3x224x224", (1, 3, 224, 224)), ("8", (8,)), ("2X16", (2, 16))])
def test_parse_shape(text, shape):
    assert cli.parse_shape(text) == shape


def test_inspect_json_is_the_report(work, capsys):
    code, out, err = run_cli(capsys, "inspect", work / "model.pt", "--trust-pickle", "--example-input", "1x4x8x8",
                             "--json", "-q", "--no-benchmark")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["command"] == "inspect" and doc["written"] is False and doc["output"] is None
    assert [r["rule"] for r in doc["report"]["rewrites"]] == ["compose+sum"]
    assert doc["gains"]["params_after"] == 148 < doc["gains"]["params_before"] == 184


def test_several_example_inputs(work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    model = __import__(FACTORY_MODULE).pair(d=8).eval()
    torch.save(model.state_dict(), tmp_path / "pair.pt")
    out = tmp_path / "pair_fused.pt"
    code, stdout, err = run_cli(capsys, "fuse", tmp_path / "pair.pt", "--model", f"{FACTORY_MODULE}:pair",
                                "--example-input", "3x8", "--example-input", "3x8", "-o", out, "-q", "--no-benchmark")
    assert code == 0, err
    fused = torch.load(out, weights_only=False)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(fused(a, b), model(a, b), atol=1e-5)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in fused.modules()) == 0
    code, _, err = run_cli(capsys, "fuse", tmp_path / "pair.pt", "--model", f"{FACTORY_MODULE}:pair",
                           "--example-input", "3x8", "-o", tmp_path / "x.pt", "-q")
    assert code == 2 and "fails on the example input" in err and "Traceback" not in err


def test_keyword_example_inputs_with_their_dtypes_for_a_state_dict(work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    model = __import__(FACTORY_MODULE).tokens().eval()
    write_safetensors(tmp_path / "tokens.safetensors", model.state_dict())
    out, report = tmp_path / "tokens_fused.pt", tmp_path / "r.json"
    code, _, err = run_cli(capsys, "fuse", tmp_path / "tokens.safetensors", "--model", f"{FACTORY_MODULE}:tokens",
                           "--example-input", "input_ids=3x7:int64", "--example-input", "attention_mask=3x7",
                           "-o", out, "--report", report, "-q", "--no-benchmark")
    assert code == 0, err
    doc = json.loads(report.read_text())
    assert doc["example_inputs"] == [{"name": "input_ids", "shape": [3, 7], "dtype": "int64"},
                                     {"name": "attention_mask", "shape": [3, 7], "dtype": "int64"}]
    assert doc["report"]["rewrites"]  # the BN folded into the linear
    fused = torch.load(out, weights_only=False)
    ids = torch.randint(0, 50, (4, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids, attention_mask=mask), model(input_ids=ids, attention_mask=mask),
                              atol=1e-5)
    code, _, err = run_cli(capsys, "fuse", tmp_path / "tokens.safetensors", "--model", f"{FACTORY_MODULE}:tokens",
                           "--example-input", "input_ids=3x7:int6", "-o", tmp_path / "x.pt", "-q")
    assert code == 2 and "unknown dtype 'int6'" in err and "Traceback" not in err


def test_example_inputs_follow_the_model_dtype_unless_told(work, tmp_path, capsys):
    torch.save(tiny().double(), tmp_path / "double.pt")
    out, report = tmp_path / "fused.pt", tmp_path / "r.json"
    base = ["fuse", tmp_path / "double.pt", "--trust-pickle", "--example-input", "1x4x8x8", "-q", "--no-benchmark"]
    code, _, err = run_cli(capsys, *base, "-o", out, "--report", report)
    assert code == 0, err
    assert json.loads(report.read_text())["example_inputs"][0]["dtype"] == "float64"
    assert torch.load(out, weights_only=False)(torch.randn(1, 4, 8, 8, dtype=torch.float64)).dtype == torch.float64
    code, _, err = run_cli(capsys, *base, "-o", tmp_path / "half.pt", "--dtype", "float16")
    assert code == 2 and "fails on the example input" in err and not (tmp_path / "half.pt").exists()


# --------------------------------------------------------------------------------------------
# output safety (issue 13)


def _special_outputs(tmp_path):
    """Paths that exist and are not regular files: (path, words the refusal must contain)."""
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    links = {name: tmp_path / f"link_to_{name}.pt" for name in ("null", "fifo", "folder")}
    links["null"].symlink_to("/dev/null")
    links["fifo"].symlink_to(fifo)
    links["folder"].symlink_to(folder)
    return [
        ("/dev/null", "is a character device, not a regular file"),
        ("/dev/full", "is a character device, not a regular file"),
        (fifo, "is a FIFO (named pipe), not a regular file"),
        (folder, "is a directory"),
        (links["null"], "is a symlink to /dev/null, a character device"),
        (links["fifo"], f"is a symlink to {fifo}, a FIFO"),
        (links["folder"], f"is a symlink to {folder}, a directory"),
    ]


def test_an_output_that_is_not_a_regular_file_is_refused_even_with_force(work, tmp_path, capsys):
    for path, message in _special_outputs(tmp_path):
        before = {p.name: (os.lstat(p).st_mode, os.lstat(p).st_mtime_ns) for p in tmp_path.iterdir()}
        for where in (["-o", path], ["-o", tmp_path / "out.pt", "--report", path]):
            code, stdout, err = run_cli(capsys, "fuse", work / "model.pt", "--trust-pickle", "--example-input",
                                        "1x4x8x8", *where, "--force", "-q", "--no-benchmark")
            assert code == cli.EXIT_BAD_INPUT, (path, err)
            assert len(err.splitlines()) == 1 and err.startswith("repc: error: ") and message in err, err
            assert "pass --force" not in err  # (--force would not help)
            assert {p.name: (os.lstat(p).st_mode, os.lstat(p).st_mtime_ns) for p in tmp_path.iterdir()} == before
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.lstat(tmp_path / "pipe.pt").st_mode)


def test_atomic_write_checks_again_before_replacing(tmp_path):
    # something that is not a regular file appeared at OUT after the checks: it is not replaced
    fifo = tmp_path / "late.pt"
    os.mkfifo(fifo)
    with pytest.raises(cli.CliError, match="FIFO") as refused:
        cli.atomic_write(str(fifo), b"data")
    assert refused.value.code == cli.EXIT_BAD_INPUT
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and [p.name for p in tmp_path.iterdir()] == ["late.pt"]
    # a regular file, and a dangling link, are replaced atomically by the new file
    (tmp_path / "plain.pt").write_bytes(b"old")
    cli.atomic_write(str(tmp_path / "plain.pt"), b"new")
    assert (tmp_path / "plain.pt").read_bytes() == b"new"
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "nowhere")
    cli.atomic_write(str(tmp_path / "dangling.pt"), b"new")
    assert not (tmp_path / "dangling.pt").is_symlink() and not (tmp_path / "nowhere").exists()


def test_an_output_that_cannot_be_written_exits_1(work, tmp_path, capsys, monkeypatch):
    # the README: "1 internal error or output not writable"; as root os.access says yes to every
    # folder, so an unwritable folder is simulated, and so is a write refused by the file system
    base = ["fuse", work / "model.pt", "--trust-pickle", "--example-input", "1x4x8x8", "-q", "--no-benchmark"]
    folder = tmp_path / "read_only"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode, **kw: False if str(p) == str(folder) and mode & os.W_OK
                        else real_access(p, mode, **kw))
    for where in (["-o", folder / "out.pt"], ["-o", tmp_path / "out.pt", "--report", folder / "r.json"]):
        code, _, err = run_cli(capsys, *base, *where)
        assert code == cli.EXIT_INTERNAL and "is not writable" in err and len(err.splitlines()) == 1, err
    monkeypatch.undo()

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", refused)
    for where in (["-o", tmp_path / "out.pt"], ["-o", tmp_path / "out.pt", "--report", tmp_path / "r.json"]):
        code, _, err = run_cli(capsys, *base, *where)
        assert code == cli.EXIT_INTERNAL and "cannot write" in err and "Permission denied" in err, err
        assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []


def test_readme_and_help_state_the_exit_codes_the_code_uses():
    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.split("## Command line")[1].splitlines() if "**Exit codes**" in l)
    text = " ".join(readme.split("## Command line")[1].split("**Exit codes**")[1].split("\n\n")[0].split())
    assert line and "0 success" in text and "1 internal error or output not writable" in text
    assert "2 bad input" in text and "3 verification failed" in text and "141" in text
    assert "not a regular file" in text
    assert (cli.EXIT_OK, cli.EXIT_INTERNAL, cli.EXIT_BAD_INPUT, cli.EXIT_VERIFICATION, cli.EXIT_BROKEN_PIPE) == \
        (0, 1, 2, 3, 141)
    assert "141" in cli.EXIT_CODES_HELP and "not a regular file" in cli.EXIT_CODES_HELP


def test_a_reader_that_goes_away_is_not_an_error(tmp_path):
    # `repc inspect --example | head -1`, and a reader that exits before anything is written
    for reader in ("head -1", "true"):
        done = subprocess.run(["bash", "-c", f'"$0" -m repc inspect --example --no-benchmark -q | {reader}; '
                                             'echo "status ${{PIPESTATUS[0]}}" >&2'.replace("{{", "{").replace("}}", "}"),
                               sys.executable], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert "Error" not in done.stderr and "internal error" not in done.stderr, done.stderr
        assert "Exception ignored" not in done.stderr, done.stderr
        assert done.stderr.splitlines()[-1] in ("status 0", f"status {cli.EXIT_BROKEN_PIPE}"), done.stderr
        if reader == "true":
            assert done.stderr.splitlines() == [f"status {cli.EXIT_BROKEN_PIPE}"], done.stderr
        else:
            assert done.stdout.startswith("repc inspect: ran the same pipeline") and done.stdout.count("\n") == 1


@pytest.mark.parametrize("tolerance, message", [
    ("1e-12", "tolerance 1e-12 is below the rounding of float32 (eps 1.19e-07)"),
    ("1e-8", "below the rounding of float32"),
    ("0", "bad --tolerance 0: it must be a positive number"),
    ("-1e-3", "must be a positive number"),
    ("nan", "must be a positive number"),
])
def test_a_tolerance_below_the_dtype_rounding_is_refused(work, tmp_path, capsys, tolerance, message):
    out = tmp_path / "out.pt"
    code, _, err = run_cli(capsys, "fuse", work / "model.pt", "--trust-pickle", "--example-input", "1x4x8x8",
                           "-o", out, f"--tolerance={tolerance}", "-q", "--no-benchmark")
    assert code == cli.EXIT_BAD_INPUT and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
    # at the dtype's rounding and above it is taken
    code, _, err = run_cli(capsys, "fuse", work / "model.pt", "--trust-pickle", "--example-input", "1x4x8x8",
                           "-o", out, "--tolerance", "1e-3", "-q", "--no-benchmark")
    assert code == 0, err


def test_inspect_reads_repcs_own_output(work, tmp_path, capsys):
    out = tmp_path / "fused.pt"
    code, _, err = run_cli(capsys, "fuse", work / "model.pt", "--trust-pickle", "--example-input", "1x4x8x8",
                           "-o", out, "-q", "--no-benchmark")
    assert code == 0, err
    fused = torch.load(out, weights_only=False)
    assert not any(m.training for m in fused.modules())
    code, stdout, err = run_cli(capsys, "inspect", out, "--trust-pickle", "--example-input", "1x4x8x8", "-q",
                                "--no-benchmark")
    assert code == 0, err
    assert "training mode" not in err and "verification passed" in stdout


# --------------------------------------------------------------------------------------------
# NaN and Inf (issue 13)


def _nan_statistics():
    model = tiny(seed=4)
    model[0].dense[1].running_var[2] = float("nan")  # one channel of one BatchNorm
    return model


def _inf_weight():
    model = tiny(seed=5)
    with torch.no_grad():
        model[0].dense[0].weight[1, 0, 1, 1] = float("inf")
    return model


@pytest.mark.parametrize("build, what", [(_nan_statistics, "NaN"), (_inf_weight, "Inf")])
def test_a_model_with_non_finite_weights_is_not_fused_and_nothing_is_written(tmp_path, capsys, build, what):
    model = build()
    torch.save(model, tmp_path / "model.pt")
    out = tmp_path / "fused.pt"
    code, stdout, err = run_cli(capsys, "fuse", tmp_path / "model.pt", "--trust-pickle", "--example-input",
                                "1x4x8x8", "-o", out, "-q", "--no-benchmark")
    # the merge that would emit a non-finite weight is refused, and the model's own NaN/Inf output
    # on the example leaves nothing to verify against
    assert code == cli.EXIT_VERIFICATION, (stdout, err)
    assert f"would hold {what}" in stdout and "non-finite weights or statistics" in stdout
    assert len(err.splitlines()) == 1 and "verification failed" in err and "nothing written" in err, err
    assert f"the original model produces {what}" in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_fused_model_that_would_carry_nan_is_not_written(work, tmp_path, capsys, monkeypatch):
    """A miscompile past the per-region check (simulated: every emitted merge adds a NaN) must be
    caught by the whole-model check: exit 3, nothing written.  This depends on
    repc/verify/check.py treating NaN where the original is finite as a deviation."""
    import repc.passes.collapse as collapse

    real = collapse.emit_form

    def poisoned(graph, namer, form, value_of, hint, dtype, device):
        out = real(graph, namer, form, value_of, hint, dtype, device)
        nan = graph.get_attr(namer.buffer(hint + "_poison", torch.tensor(float("nan"), dtype=dtype, device=device)))
        return graph.call_function(torch.add, (out, nan))

    monkeypatch.setattr(collapse, "emit_form", poisoned)
    out, report = tmp_path / "fused.pt", tmp_path / "report.json"
    code, stdout, err = run_cli(capsys, "fuse", work / "model.pt", "--trust-pickle", "--example-input", "1x4x8x8",
                                "-o", out, "--report", report, "-q", "--no-benchmark")
    assert code == cli.EXIT_VERIFICATION, (stdout, err)
    assert "verification failed" in err and "nothing written" in err and len(err.splitlines()) == 1
    assert not out.exists() and json.loads(report.read_text())["written"] is False


def _fresh_preserved(model, x):
    """The module-preserving fused model repc.compile gives, to load a written state dict into."""
    return repc.compile(model, (x,), graph=False)


def test_a_safetensors_out_is_the_state_dict_of_the_model_with_its_modules_swapped_in(capsys, tmp_path):
    out, report = tmp_path / "fused.safetensors", tmp_path / "report.json"
    code, stdout, err = run_cli(capsys, "fuse", "--example", "-o", out, "--report", report, "--no-benchmark", "-q")
    assert code == 0, err
    from safetensors import safe_open
    from safetensors.torch import load_file
    state = load_file(str(out))
    assert "stage1.0.conv.weight" in state and not any("_fused" in k for k in state)  # module paths, not fx names
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["repc_output"] == "module-preserving"
    doc = json.loads(report.read_text())
    assert doc["format"] == "state-dict" and doc["written_as"].startswith("state dict (safetensors) of the model's")
    assert doc["state_dict_fits_architecture"] is False  # its blocks are merged convs now
    assert "safetensors.torch.load_file(path)" in stdout and "the fused model" in stdout
    x = torch.randn(2, 3, 32, 32)
    target = _fresh_preserved(example_net(), x)
    target.load_state_dict(state, strict=True)
    with torch.no_grad():
        y = torch.randn(3, 3, 24, 24)
        want = example_net()(y)
        assert (target(y) - want).abs().max() / want.abs().max() < 1e-4


def test_a_pt_state_dict_and_a_pickled_module_are_written_on_request(capsys, tmp_path):
    weights = tmp_path / "fused_weights.pt"
    code, stdout, err = run_cli(capsys, "fuse", "--example", "-o", weights, "--format", "state-dict", "--no-benchmark",
                                "-q")
    assert code == 0, err
    state = torch.load(weights, weights_only=True)
    assert isinstance(state, dict) and "stage1.0.conv.weight" in state and "torch.load(path)" in stdout
    module = tmp_path / "fused_module.pt"
    code, stdout, err = run_cli(capsys, "fuse", "--example", "-o", module, "--format", "module", "--no-benchmark", "-q")
    assert code == 0, err
    fused = torch.load(module, weights_only=False)
    assert type(fused).__name__ == "ExampleNet" and fused.repc_report["output"] == "module-preserving"
    assert "repc.examples" in stdout  # the model's own code is what loading needs
    with torch.no_grad():
        y = torch.randn(2, 3, 32, 32)
        want = example_net()(y)
        assert (fused(y) - want).abs().max() / want.abs().max() < 1e-4
    assert set(fused.state_dict()) == set(state)


def test_a_state_dict_that_fits_the_architecture_is_said_to(capsys, tmp_path, work, monkeypatch):
    """A linear chain folded by the emitted module itself keeps no Identity: here the architecture
    differs (BN gone), and the report says so; a model repc leaves unchanged fits."""
    monkeypatch.chdir(work)
    out, report = tmp_path / "pair.safetensors", tmp_path / "pair.json"
    code, _, err = run_cli(capsys, "fuse", work / "weights.safetensors", "--model", f"{FACTORY_MODULE}:build",
                           "--example-input", "2x4x8x8", "-o", out, "--report", report, "--no-benchmark", "-q")
    assert code == 0, err
    doc = json.loads(report.read_text())
    assert doc["state_dict_fits_architecture"] is False and doc["report"]["output"] == "module-preserving"


# ----------------------------------------------------------------------------- a transformers directory

@pytest.fixture
def llama_dirs(tmp_path):
    """A Llama directory saved in shards and a LoRA adapter directory (PEFT's layouts), random weights."""
    import warnings
    import peft
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    base = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # (unit norms hide folding errors)
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    (tmp_path / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                                         init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    return tmp_path / "base", tmp_path / "lora"


def test_a_model_directory_and_its_adapter_merge_into_a_directory_from_pretrained_loads(llama_dirs, tmp_path, capsys):
    import peft
    import transformers
    base_dir, adapter_dir = llama_dirs
    out = tmp_path / "merged"
    code = cli.main(["fuse", str(base_dir), "--adapter", str(adapter_dir), "-o", str(out), "-q",
                     "--example-input", "input_ids=2x9:int64", "--example-input", "attention_mask=2x9:int64"])
    assert code == 0, capsys.readouterr().err
    files = set(os.listdir(out))
    assert {"config.json", "tokenizer_config.json", "repc_report.json", "model.safetensors.index.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded as the base was
    report = json.loads((out / "repc_report.json").read_text())
    assert len(report["merged_layers"]) == 8 and report["adapter"] == str(adapter_dir)
    reloaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    merged = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                                            adapter_dir).merge_and_unload().eval()
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = reloaded.eval()(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-5
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".merged")]  # no temporary left


def test_a_model_directory_refuses_an_output_it_did_not_write_and_bad_inputs_in_one_line(llama_dirs, tmp_path, capsys):
    base_dir, adapter_dir = llama_dirs
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    assert cli.main(["fuse", str(base_dir), "-o", str(mine), "--force", "-q"]) == 2
    assert "did not write" in capsys.readouterr().err and (mine / "keep.txt").exists()
    assert cli.main(["fuse", str(base_dir), "-o", str(base_dir), "-q"]) == 2
    assert "input directory" in capsys.readouterr().err
    assert cli.main(["fuse", str(base_dir), "-o", str(tmp_path / "o"), "--example-input", "1x3x8", "-q"]) == 2
    assert "keyword inputs" in capsys.readouterr().err
    assert cli.main(["fuse", str(base_dir), "--adapter", str(tmp_path), "-o", str(tmp_path / "o"), "-q"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_model_directory_whose_adapter_is_left_unmerged_somewhere_writes_nothing(llama_dirs, tmp_path, capsys):
    # LoRA on the token embedding stays a peft layer: saving would write the adapter, not a model
    import warnings
    import peft
    import transformers
    base_dir, _ = llama_dirs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                                   peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                                   init_lora_weights=False))
    lora.save_pretrained(tmp_path / "embedding_lora")
    out = tmp_path / "merged"
    code = cli.main(["fuse", str(base_dir), "--adapter", str(tmp_path / "embedding_lora"), "-o", str(out), "-q",
                     "--example-input", "input_ids=2x9:int64"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_VERIFICATION, err
    assert "adapter is left unmerged in 1 layer(s)" in err and "embed_tokens" in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".merged")]


def test_a_vision_model_directory_takes_pixel_values_and_says_when_it_cannot_guess_them(tmp_path, capsys):
    import transformers
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64)
    vit = transformers.ViTModel(config).eval()
    vit.save_pretrained(tmp_path / "vit")
    out = tmp_path / "merged"
    code = cli.main(["fuse", str(tmp_path / "vit"), "-o", str(out), "-q"])  # pixel_values 1x3x16x16, from the config
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "repc_report.json").read_text())
    assert report["example_inputs"] == {"pixel_values": {"shape": [1, 3, 16, 16], "dtype": "torch.float32"}}
    reloaded, info = transformers.ViTModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reloaded.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want, got = vit(x), reloaded(x)
        for name in ("last_hidden_state", "pooler_output"):
            assert (got[name] - want[name]).abs().max() / want[name].abs().max() < 1e-5
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "no_pooler")
    capsys.readouterr()
    assert cli.main(["fuse", str(tmp_path / "no_pooler"), "-o", str(tmp_path / "p"), "-q"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err  # (from_pretrained would draw that weight at random: not a merge of this one)
    assert "the checkpoint has no weight pooler.dense.weight" in err and len(err.strip().splitlines()) == 1
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    resnet.save_pretrained(tmp_path / "resnet")
    capsys.readouterr()
    assert cli.main(["fuse", str(tmp_path / "resnet"), "-o", str(tmp_path / "r"), "-q"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "no vocabulary and no image size" in err and "pixel_values=1x3x224x224" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()

