"""``flexlora aggregate`` end to end: real PEFT adapters in, PEFT-loadable adapters out.

The reference never goes through flexlora: each input adapter is loaded by PEFT, its ΔW read
off the loaded modules (``scaling·lora_B·lora_A``), the weighted dense sum formed and its SVD
truncated with numpy in float64.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flexlora.aggregate_cmd import ClientSpec, parse_client
from flexlora.cli import main
from flexlora.errors import InvalidUpdateError
from flexlora.lora.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_adapter

CLIENTS = [  # (rank, rank_pattern, weight): three ranks, one FFN module at its own rank
    (2, {"gate_proj": 10}, 1.0),
    (6, {}, 2.0),
    (12, {}, 5.0),
]


# --- the reference, through PEFT only --------------------------------------------------------


def peft_deltas(base: Path, adapter: Path, load_base) -> dict[str, np.ndarray]:
    """Every adapted module's effective ΔW as PEFT loads it, in float64."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base), adapter)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            A = module.lora_A["default"].weight.detach().double()  # (r, n)
            B = module.lora_B["default"].weight.detach().double()  # (m, r)
            out[name] = (module.scaling["default"] * (B @ A)).numpy()
    return out


def truncate(W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r], S


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def clients(tiny_llama, peft_tools, tmp_path_factory) -> list[Path]:
    save_peft_adapter, _ = peft_tools
    root = tmp_path_factory.mktemp("clients")
    return [
        save_peft_adapter(tiny_llama, root / f"client-{i}", r, seed=i + 1, rank_pattern=pattern)
        for i, (r, pattern, _) in enumerate(CLIENTS)
    ]


@pytest.fixture(scope="module")
def dense_sum(clients, tiny_llama, peft_tools) -> dict[str, np.ndarray]:
    """Σ p_i·ΔW_i per module, p ∝ the CLI weights, from PEFT-loaded inputs."""
    _, load_base = peft_tools
    weights = [w for *_, w in CLIENTS]
    total = {}
    for folder, w in zip(clients, weights, strict=True):
        for name, delta in peft_deltas(tiny_llama, folder, load_base).items():
            total[name] = total.get(name, 0.0) + (w / sum(weights)) * delta
    return total


def client_args(clients: list[Path]) -> list[str]:
    args = []
    for folder, (*_, w) in zip(clients, CLIENTS, strict=True):
        args += ["--client", f"{folder}:{w:g}"]
    return args


def check_output(out: Path, r: int, dense_sum, tiny_llama, load_base, tol: float, gap: float):
    """The adapter at out/rank-r, loaded by PEFT, is the rank-r truncation of the dense sum."""
    got = peft_deltas(tiny_llama, out / f"rank-{r}", load_base)
    assert set(got) == set(dense_sum) and len(got) == 14
    for name, W in dense_sum.items():
        ref, S = truncate(W, r)
        assert S[r - 1] - S[r] >= gap * S[0], f"{name}: rank {r} sits in a cluster; pick a seed"
        assert rel_err(got[name], ref) <= tol, name


def test_aggregate_three_peft_adapters_in_process(
    clients, dense_sum, tiny_llama, peft_tools, tmp_path, capsys
) -> None:
    _, load_base = peft_tools
    out = tmp_path / "out"
    argv = ["aggregate", *client_args(clients), "--rank", "2", "--rank", "12"]
    assert main([*argv, "--out", str(out), "--dtype", "float64"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'rank-2'} (rank 2, keeps" in printed
    assert sorted(p.name for p in out.iterdir()) == ["rank-12", "rank-2"]
    for r in (2, 12):
        check_output(out, r, dense_sum, tiny_llama, load_base, tol=1e-5, gap=1e-3)
    # split="balanced" writes other factors with the same products
    balanced = tmp_path / "balanced"
    assert main([*argv, "--out", str(balanced), "--split", "balanced", "--dtype", "float64"]) == 0
    check_output(balanced, 12, dense_sum, tiny_llama, load_base, tol=1e-5, gap=1e-3)


def test_aggregate_as_a_real_subprocess(clients, dense_sum, tiny_llama, peft_tools, tmp_path):
    _, load_base = peft_tools
    script = Path(sys.executable).with_name("flexlora")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "flexlora.cli"]
    out = tmp_path / "sub"
    done = subprocess.run(
        [*command, "aggregate", *client_args(clients), "--rank", "6", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    check_output(out, 6, dense_sum, tiny_llama, load_base, tol=1e-4, gap=3e-3)
    # an input error exits with 2, names the folder, and writes nothing
    bad = tmp_path / "bad-out"
    nowhere = str(tmp_path / "nowhere")
    done = subprocess.run(
        [*command, "aggregate", "--client", nowhere, "--rank", "2", "--out", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert str(tmp_path / "nowhere") in done.stderr and "Traceback" not in done.stderr
    assert not bad.exists()


def test_written_adapter_gives_the_logits_of_base_plus_dense_delta(
    clients, dense_sum, tiny_llama, peft_tools, tmp_path
) -> None:
    from peft import PeftModel

    _, load_base = peft_tools
    out = tmp_path / "out"
    assert main(["aggregate", *client_args(clients), "--rank", "12", "--out", str(out)]) == 0
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(load_base(tiny_llama), out / "rank-12")(ids).logits
        merged = load_base(tiny_llama)
        base_logits = merged(ids).logits
        modules = dict(merged.named_modules())
        for name, W in dense_sum.items():
            ref, _ = truncate(W, 12)
            modules[name].weight += torch.from_numpy(ref).float()  # (m, n), merged by hand
        by_hand = merged(ids).logits
    assert not torch.allclose(by_hand, base_logits, atol=1e-3)  # the update matters
    torch.testing.assert_close(adapted, by_hand, rtol=1e-4, atol=1e-4)


# --- errors: exit 2, say where, write nothing ------------------------------------------------

Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.0.mlp.up_proj"


def small_adapter(folder: Path, r: int, *, seed: int, alpha: float = 16.0, **changes) -> Path:
    """An adapter on two modules; ``changes`` replace one module's (A, B) or drop it (None)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        Q: (torch.randn(r, 8, generator=g), torch.randn(8, r, generator=g)),
        UP: (torch.randn(r, 8, generator=g), torch.randn(12, r, generator=g)),
    }
    for key, value in changes.items():
        name = {"q": Q, "up": UP}[key]
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    from flexlora.types import LoRAFactors

    factors = {name: LoRAFactors(A, B, alpha) for name, (A, B) in tensors.items()}
    return write_adapter(folder, factors, template={"base_model_name_or_path": "tiny"})


def snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "/"
        for p in sorted(folder.rglob("*"))
    }


def run_failing(argv: list[str], out: Path, capsys) -> str:
    """Run the CLI, expect exit 2 and an untouched --out; return stderr."""
    before = snapshot(out)
    existed = out.exists()
    code = main(["aggregate", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("flexlora aggregate: error: ")
    assert out.exists() == existed and snapshot(out) == before
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return err


@pytest.fixture
def good(tmp_path) -> list[Path]:
    return [
        small_adapter(tmp_path / "a", 2, seed=0),
        small_adapter(tmp_path / "b", 4, seed=1),
    ]


CONFIG_FAULTS = {  # adapter_config.json values that would reach the math as a bad scaling
    "alpha_zero": {"lora_alpha": 0},
    "alpha_nan": {"lora_alpha": float("nan")},
    "alpha_inf_pattern": {"alpha_pattern": {"q_proj": float("inf")}},
    "rank_pattern_zero": {"rank_pattern": {"q_proj": 0}},
    "rank_pattern_list": {"rank_pattern": ["q_proj"]},
}


def broken(tmp_path: Path, kind: str) -> tuple[Path, str | None]:
    """A client folder with one fault; returns it and the module the error must name."""
    folder = tmp_path / f"bad-{kind}"
    if kind == "no_config":
        small_adapter(folder, 3, seed=2)
        (folder / ADAPTER_CONFIG).unlink()
        return folder, None
    if kind == "corrupt":
        small_adapter(folder, 3, seed=2)
        (folder / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 40)
        return folder, None
    if kind == "bin_only":
        small_adapter(folder, 3, seed=2)
        (folder / ADAPTER_WEIGHTS).rename(folder / "adapter_model.bin")
        return folder, None
    if kind in CONFIG_FAULTS:
        small_adapter(folder, 3, seed=2)
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
        cfg.update(CONFIG_FAULTS[kind])
        (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg))  # NaN and Infinity as Python writes
        return folder, None
    if kind == "missing_module":
        return small_adapter(folder, 3, seed=2, up=None), UP
    if kind == "shape":
        return small_adapter(folder, 3, seed=2, up=(torch.ones(3, 8), torch.ones(10, 3))), UP
    if kind in ("nan", "inf"):
        B = torch.ones(12, 3)
        B[0, 0] = float("nan") if kind == "nan" else float("inf")
        return small_adapter(folder, 3, seed=2, up=(torch.ones(3, 8), B)), UP
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("no_config", "no adapter_config.json"),
        ("corrupt", "cannot be read"),
        ("bin_only", "adapter_model.bin is a pickle and is never loaded"),
        ("missing_module", "missing"),
        ("shape", "10x8"),
        ("nan", "NaN or Inf"),
        ("inf", "NaN or Inf"),
        ("alpha_zero", "lora_alpha must be a positive finite number, got 0.0"),
        ("alpha_nan", "lora_alpha must be a positive finite number, got nan"),
        ("alpha_inf_pattern", "alpha_pattern['q_proj'] must be a positive finite number"),
        ("rank_pattern_zero", "rank_pattern['q_proj'] must be positive, got 0"),
        ("rank_pattern_list", "not a valid LoRA config"),
    ],
)
def test_bad_client_folders_exit_2_naming_folder_and_module(
    kind: str, needle: str, good, tmp_path, capsys
) -> None:
    folder, module = broken(tmp_path, kind)
    for order in ([*good, folder], [folder, *good]):
        argv = [a for f in order for a in ("--client", str(f))] + ["--rank", "2"]
        err = run_failing(argv, tmp_path / "out", capsys)
        assert needle in err
        # the odd client out is blamed, whichever comes first
        assert f"client {folder}" in err
        if module is not None:
            assert f"module {module}" in err


def test_pre_existing_out_is_unchanged_after_a_failure(good, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["aggregate", "--client", str(good[0]), "--rank", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")
    folder, _ = broken(tmp_path, "nan")
    argv = ["--client", str(good[0]), "--client", str(folder), "--rank", "2", "--rank", "3"]
    run_failing(argv, out, capsys)


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf", "-0.5"])
def test_non_positive_weights_exit_2(weight: str, good, tmp_path, capsys) -> None:
    argv = ["--client", f"{good[0]}:{weight}", "--client", str(good[1]), "--rank", "2"]
    err = run_failing(argv, tmp_path / "out", capsys)
    assert f"client {good[0]}" in err and "weight must be > 0" in err


@pytest.mark.parametrize("weight", ["1e39", "1e300"])
def test_weights_past_float32_range_give_the_weighted_sum(weight: str, tmp_path) -> None:
    """Only the ratios of the --client weights count: 1e39 : 1e39 is 1 : 1 (it overflowed
    float32 and crashed in the SVD)."""
    folders = [small_adapter(tmp_path / f"c{i}", 2 + i, seed=i) for i in range(2)]
    outs = {}
    for w in ("1", weight):
        outs[w] = tmp_path / f"out-{w}"
        argv = [a for f in folders for a in ("--client", f"{f}:{w}")]
        assert main(["aggregate", *argv, "--rank", "5", "--out", str(outs[w])]) == 0
    from flexlora.lora.peft_io import load_adapter

    for name in (Q, UP):
        ref = load_adapter(outs["1"] / "rank-5").factors[name].delta()
        got = load_adapter(outs[weight] / "rank-5").factors[name].delta()
        torch.testing.assert_close(got, ref)


def test_an_update_too_large_for_float32_exit_2(tmp_path, capsys) -> None:
    """Finite factors whose product overflows float32: exit 2 naming the module, whether
    the SVD fails on the sum or gives NaN factors (written with exit 0 before)."""
    big = (torch.full((2, 8), 1e20), torch.full((12, 2), 1e20))
    folder = small_adapter(tmp_path / "big", 2, seed=0, up=big)
    for clients in ([folder], [folder, small_adapter(tmp_path / "small", 3, seed=1)]):
        argv = [a for f in clients for a in ("--client", str(f))]
        err = run_failing([*argv, "--rank", "2"], tmp_path / "out", capsys)
        assert f"module {UP}" in err and "[nonfinite]" in err and "--dtype float64" in err
    # in float64 the sum is finite, but ΔW (~1e41) does not fit the clients' float32
    argv = ["--client", str(folder), "--rank", "2", "--dtype", "float64"]
    assert "torch.float32 output" in run_failing(argv, tmp_path / "out", capsys)


@pytest.mark.parametrize("strategy", ["flexlora", "fedit"])
def test_a_rank_past_the_update_is_padded_as_the_simulator_pads(
    strategy: str, tmp_path, capsys
) -> None:
    """2 + 4 = 6 components for q (8x8) and up (12x8): --rank 7 (and 9, past min(m, n) = 8)
    write adapters of that rank whose extra components have zero B and PEFT-drawn A, so ΔW
    is the whole update (as --rank 6 writes it), and say which modules were padded. The
    simulator hands a client a rank past its module's update the same way."""
    from flexlora.lora.peft_io import load_adapter

    clients = [small_adapter(tmp_path / n, 4, seed=i) for i, n in enumerate("ab")]
    if strategy == "flexlora":
        clients[0] = small_adapter(tmp_path / "a2", 2, seed=0)
    argv = [a for f in clients for a in ("--client", str(f))] + ["--strategy", strategy]
    out = tmp_path / "out"
    ranks = ["6", "7", "9"] if strategy == "flexlora" else ["4", "7"]
    assert (
        main(["aggregate", *argv, *(a for r in ranks for a in ("--rank", r)), "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "padded with zero-B ones" in printed and "padded" not in printed.split("\n")[0]
    whole = load_adapter(out / f"rank-{ranks[0]}").factors
    for r in ranks[1:]:
        written = load_adapter(out / f"rank-{r}").factors
        assert written.keys() == whole.keys()
        for module, f in written.items():
            held = whole[module].rank
            assert f.rank == int(r) and bool((f.B[:, held:] == 0).all())
            assert bool((f.A[held:] != 0).any())  # trainable, as PEFT initialises A
            want = whole[module].scaling * whole[module].B.double() @ whole[module].A.double()
            got = f.scaling * f.B.double() @ f.A.double()
            assert float(torch.linalg.norm(got - want)) <= 1e-5 * float(torch.linalg.norm(want))


def test_differing_alpha_needs_alpha_flag(good, tmp_path, capsys) -> None:
    other = small_adapter(tmp_path / "c", 3, seed=5, alpha=32.0)
    argv = ["--client", str(good[0]), "--client", str(other), "--rank", "2"]
    err = run_failing(argv, tmp_path / "out", capsys)
    assert "different lora_alpha" in err and "--alpha" in err
    assert str(good[0]) in err and str(other) in err and "module model.layers.0" in err
    assert main(["aggregate", *argv, "--alpha", "8", "--out", str(tmp_path / "out")]) == 0
    assert '"lora_alpha": 8' in (tmp_path / "out" / "rank-2" / ADAPTER_CONFIG).read_text()
    err = run_failing([*argv, "--alpha", "-1"], tmp_path / "out2", capsys)
    assert "--alpha" in err


@pytest.mark.parametrize("spelling", ["same", "slash", "dot", "symlink"])
def test_a_folder_given_twice_exit_2(spelling: str, good, tmp_path, capsys, monkeypatch) -> None:
    """The same folder under another spelling would count that client twice."""
    monkeypatch.chdir(tmp_path)
    again = {
        "same": str(good[0]),
        "slash": f"{good[0]}/",
        "dot": f"./{good[0].name}",
        "symlink": str(tmp_path / "link"),
    }[spelling]
    (tmp_path / "link").symlink_to(good[0])
    argv = ["--client", str(good[0]), "--client", str(good[1]), "--client", f"{again}:2"]
    err = run_failing([*argv, "--rank", "2"], tmp_path / "out", capsys)
    assert f"client {again}" in err and f"the same folder as client {good[0]}" in err


def test_fedit_with_mixed_ranks_exit_2(good, tmp_path, capsys) -> None:
    argv = [a for f in good for a in ("--client", str(f))] + ["--rank", "2"]
    err = run_failing([*argv, "--strategy", "fedit"], tmp_path / "out", capsys)
    assert f"client {good[1]}" in err and "fedit needs one rank" in err and "module " in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--rank", "2"], "at least one --client"),
        (["--client", "X"], "at least one --rank"),
        (["--client", "X", "--rank", "0"], "--rank must be positive"),
        (["--client", "X", "--rank", "2", "--strategy", "fedavg"], "unknown strategy"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], needle: str, good, tmp_path, capsys) -> None:
    argv = [str(good[0]) if a == "X" else a for a in argv]
    assert needle in run_failing(argv, tmp_path / "out", capsys)


def test_out_that_is_a_file_exit_2(good, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    for target in (out, out / "below"):
        err = run_failing(["--client", str(good[0]), "--rank", "2"], target, capsys)
        assert f"--out {target}: {out} exists and is not a folder" in err
    assert out.read_text() == "a file"


def test_argparse_errors_exit_2(tmp_path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["aggregate", "--client", "x", "--rank", "two", "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("runs/a", ClientSpec("runs/a", 1.0)),
        ("runs/a:2.5", ClientSpec("runs/a", 2.5)),
        ("runs/a:1e3", ClientSpec("runs/a", 1000.0)),
        ("C:\\runs\\a", ClientSpec("C:\\runs\\a", 1.0)),
        ("runs/a:", ClientSpec("runs/a:", 1.0)),
        (":3", ClientSpec(":3", 1.0)),
    ],
)
def test_parse_client(spec: str, expected: ClientSpec) -> None:
    assert parse_client(spec) == expected


@pytest.mark.parametrize("spec", ["d:0", "d:-1", "d:nan", "d:inf", "d:-inf"])
def test_parse_client_refuses_non_positive_weights(spec: str) -> None:
    with pytest.raises(InvalidUpdateError) as info:
        parse_client(spec)
    assert (info.value.client, info.value.reason) == ("d", "weight")


@pytest.mark.parametrize("strategy", ["flexlora", "hetlora", "ffa", "fedit"])
def test_every_strategy_runs_from_the_cli(strategy: str, tmp_path, capsys) -> None:
    """Same-rank clients with a shared A, so every strategy accepts them."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 8, generator=g)
    folders = [
        small_adapter(tmp_path / f"c{i}", 3, seed=i, q=(A, torch.randn(8, 3, generator=g)))
        for i in range(2)
    ]
    for f in folders:  # the up module's A must be shared too for ffa
        src = folders[0] / ADAPTER_WEIGHTS
        if f != folders[0] and strategy == "ffa":
            shutil.copy(src, f / ADAPTER_WEIGHTS)
    out = tmp_path / "out"
    argv = ["aggregate", *[a for f in folders for a in ("--client", str(f))], "--rank", "3"]
    assert main([*argv, "--strategy", strategy, "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "rank-3" / ADAPTER_WEIGHTS).is_file()


def test_hetlora_client_weights_multiply_its_norm_weights(good, tmp_path) -> None:
    """HetLoRA weighs by ||s*B*A||_F; a --client weight scales that client's share."""
    from flexlora.lora.peft_io import load_adapter

    def run(weight: str, out: Path) -> torch.Tensor:
        argv = [
            "aggregate",
            "--strategy",
            "hetlora",
            "--client",
            f"{good[0]}:{weight}",
            "--client",
            str(good[1]),
            "--rank",
            "4",
            "--out",
            str(out),
        ]
        assert main(argv) == 0
        return load_adapter(out / "rank-4").factors[Q].delta()

    plain, heavy = run("1", tmp_path / "w1"), run("9", tmp_path / "w9")
    assert not torch.allclose(plain, heavy)


def test_output_dtype_is_the_widest_of_the_clients(tmp_path) -> None:
    """A bf16 client first and a float32 one after: the output is float32 (it followed the
    first client and rounded the float32 client's precision away); bf16 with fp16 gives
    float32 too, and all-bf16 clients stay bf16."""
    from safetensors.torch import load_file, save_file

    def client(name: str, dtype: torch.dtype) -> str:
        folder = small_adapter(tmp_path / name, 2, seed=len(name))
        weights = folder / ADAPTER_WEIGHTS
        tensors = {k: v.to(dtype) for k, v in load_file(str(weights)).items()}
        save_file(tensors, str(weights))
        return str(folder)

    cases = {
        "mixed": [("a", torch.bfloat16), ("bb", torch.float32)],
        "halves": [("c", torch.bfloat16), ("dd", torch.float16)],
        "bf16": [("e", torch.bfloat16), ("ff", torch.bfloat16)],
    }
    expected = {"mixed": torch.float32, "halves": torch.float32, "bf16": torch.bfloat16}
    for case, specs in cases.items():
        folders = [client(n, d) for n, d in specs]
        out = tmp_path / f"out-{case}"
        argv = [a for f in folders for a in ("--client", f)]
        assert main(["aggregate", *argv, "--rank", "2", "--out", str(out)]) == 0
        got = load_file(str(out / "rank-2" / ADAPTER_WEIGHTS))
        assert {v.dtype for v in got.values()} == {expected[case]}, case
