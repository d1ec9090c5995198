"""Every script in benchmarks/ runs end to end with --smoke and prints its result as JSON.

Nothing in the package imports the benchmarks, so a library change that breaks one shows
nowhere else (issue #27: overhead.py timed a function that had moved). Each test runs a
script as a user does, in a subprocess from the repository root, at the sizes --smoke
sets, and reads its last stdout line: the same keys as a full run, values in range. The
figures of a smoke run measure nothing, so no test asserts a target.

Most of a smoke run is start-up, not size: each script is one or more fresh Pythons that
import torch and MLflow and create an MLflow store, and ssr.py and ray_scaling.py start
Ray. So the selected scripts run two at a time (a core each), the longest first, and each
test waits for its own.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # fresh Pythons, two of them start Ray

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# Longest first, so that the two lanes end together; the tests below follow this order.
ORDER = ["ray_scaling", "ssr", "partial_tuning", "baselines", "overhead", "compressed_replay",
         "editing", "larimar", "lm_overhead", "report_speed"]  # fmt: skip
AT_ONCE = 2
TIMEOUT_S = 600


class SmokeRuns:
    """`python benchmarks/<name>.py --smoke` for each name, AT_ONCE at a time, in order."""

    def __init__(self, names: list[str], folder: Path) -> None:
        self.pending, self.folder = list(names), folder
        self.running: dict[str, tuple[subprocess.Popen, float]] = {}
        self.ended: dict[str, tuple[int, float]] = {}  # name -> (exit code, seconds)

    def result(self, name: str) -> dict:
        """The script's last stdout line, as strict JSON, once it has ended with code 0."""
        if name not in self.pending and name not in self.running and name not in self.ended:
            self.pending.append(name)
        while name not in self.ended:
            self._advance()
        code, seconds = self.ended[name]
        out, err = (self.folder / f"{name}.{k}" for k in ("out", "err"))
        print(f"benchmarks/{name}.py --smoke: {seconds:.1f} s")
        assert seconds < TIMEOUT_S, f"{name} --smoke was stopped after {TIMEOUT_S} s"
        assert code == 0, f"{name} --smoke exited {code}:\n{err.read_text()[-4000:]}"
        lines = out.read_text().strip().splitlines()
        assert lines, f"{name} --smoke printed nothing on stdout"
        return json.loads(lines[-1], parse_constant=_no_constant)

    def _advance(self) -> None:
        while self.pending and len(self.running) < AT_ONCE:
            name = self.pending.pop(0)
            self.running[name] = (self._start(name), time.monotonic())
        for name, (process, started) in list(self.running.items()):
            if process.poll() is None and time.monotonic() - started > TIMEOUT_S:
                os.killpg(process.pid, signal.SIGKILL)
            if process.poll() is not None:
                self.ended[name] = (process.wait(), time.monotonic() - started)
                del self.running[name]
        time.sleep(0.1)

    def _start(self, name: str) -> subprocess.Popen:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "FORGETLESS_CACHE": str(self.folder / f"{name}-cache"),  # base models: here
        }
        env.pop("RAY_ADDRESS", None)  # the Ray benchmarks measure the embedded instance
        # Files, not pipes: a script that logs more than a pipe holds would block.
        with (
            open(self.folder / f"{name}.out", "w") as out,
            open(self.folder / f"{name}.err", "w") as err,
        ):
            return subprocess.Popen(
                [sys.executable, f"benchmarks/{name}.py", "--smoke"],
                cwd=ROOT, env=env, stdout=out, stderr=err,
                start_new_session=True,  # a group: its Ray and subprocesses end with it
            )  # fmt: skip

    def stop(self) -> None:
        for process, _ in self.running.values():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def smoke(request, tmp_path_factory):
    """Starts the selected benchmarks' smoke runs; `smoke.result(name)` waits for one."""
    selected = {item.name for item in request.session.items}
    runs = SmokeRuns([n for n in ORDER if f"test_{n}_smoke" in selected],
                     tmp_path_factory.mktemp("smoke"))  # fmt: skip
    yield runs
    runs.stop()


def _no_constant(name: str):
    raise AssertionError(f"the result holds {name}, which is not JSON; write null instead")


def score(value) -> bool:
    return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {
        p.stem for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()
    }
    here = {n[5:-6] for n in globals() if n.startswith("test_") and n.endswith("_smoke")}
    elsewhere = {m for path in Path(__file__).parent.glob("test_*.py")
                 for m in re.findall(r"def test_(\w+?)_smoke", path.read_text())}  # fmt: skip
    tested = here | elsewhere
    assert scripts, "no benchmark scripts found"
    assert scripts <= tested, (
        f"benchmarks without a smoke test: {sorted(scripts - tested)}; give each a --smoke "
        "flag, a test_<name>_smoke below and its place in ORDER"
    )
    assert set(ORDER) == here, "ORDER lists every smoke test's script once"


def test_ray_scaling_smoke(smoke):
    result = smoke.result("ray_scaling")
    assert set(result) == {
        "speedup", "speedup_short_cells", "ray_startup_s", "per_cell_overhead_s",
        "per_cell_overhead_s_short_cells", "speedup_cpu_bound", "speedup_cpu_bound_short_cells",
        "cell_train_s_median", "cell_train_s_median_short_cells", "target_speedup", "target_met",
        "runs", "smoke",
    }  # fmt: skip
    assert positive(result["speedup"]) and positive(result["speedup_short_cells"])
    assert positive(result["ray_startup_s"])
    assert set(result["runs"]) == {"epochs_1"}  # one length for both; a full run: 240 and 60
    for run in result["runs"].values():
        assert run["cells"] == 2 and run["config"]["ray_cpus"] >= 1
        assert run["results_match"] is True  # the same cells give the same scores on Ray
        assert score(run["final_avg_acc_mean"])
        assert positive(run["sequential_s"]) and positive(run["ray_s"])


def test_ssr_smoke(smoke):
    result = smoke.result("ssr")
    methods = ("naive", "rehearsal", "ssr")
    per_method = {f"{name}_{m}{suffix}" for m in methods for name in ("acc", "retention")
                  for suffix in ("", "_std", "_per_seed")}  # fmt: skip
    per_method |= {f"{name}_{m}" for m in methods for name in ("memory_bytes", "train_time_s")}
    assert set(result) == per_method | {
        "gain_recovered", "retention_recovered", "gain_recovered_per_seed",
        "real_instances_in_ssr_buffers", "seeds", "tasks", "train_size", "base_s", "grid_s",
        "targets", "smoke",
    }  # fmt: skip
    assert result["seeds"] == 1 and set(result["gain_recovered_per_seed"]) == {"0"}
    for m in methods:
        assert score(result[f"acc_{m}"]) and all(score(a) for a in result[f"acc_{m}_per_seed"])
        assert positive(result[f"train_time_s_{m}"])
    memory = {m: result[f"memory_bytes_{m}"] for m in methods}
    assert memory["rehearsal"] > 0 and memory["ssr"] > 0, memory
    assert result["real_instances_in_ssr_buffers"] == 0
    assert result["targets"]["no_real_instance_kept"] is True


def test_partial_tuning_smoke(smoke):
    result = smoke.result("partial_tuning")
    figures = {"time_per_step_s", "peak_rss_mb", "avg_acc", "forgetting", "learning_acc",
               "general_retention", "cell_wall_s"}  # fmt: skip
    methods = ("fft", "hft", "lora")
    assert set(result) == {f"{m}_{k}" for m in methods for k in figures} | {
        "hft_time_vs_fft", "lora_time_vs_fft", "interleaved_time_per_step_s",
        "hft_time_vs_fft_of_whole_cells", "hft_time_vs_fft_expected_from_flops",
        "fft_new_task_acc", "hft_new_task_acc", "seeds", "per_seed", "targets", "smoke",
    }  # fmt: skip
    assert result["seeds"] == [0] and set(result["per_seed"]) == set(methods)
    for m in methods:
        assert score(result[f"{m}_avg_acc"]) and score(result[f"{m}_learning_acc"])
        assert positive(result[f"{m}_time_per_step_s"]) and positive(result[f"{m}_peak_rss_mb"])
        retention = result[f"{m}_general_retention"]
        assert retention is None or retention >= 0  # None: the base scores 0 on its general set
    assert set(result["interleaved_time_per_step_s"]) == set(methods)
    assert positive(result["hft_time_vs_fft"]) and positive(result["lora_time_vs_fft"])
    assert 0 < result["hft_time_vs_fft_expected_from_flops"] < 1
    assert len(result["targets"]) == 4


def test_baselines_refuses_a_row_it_does_not_have_and_lists_its_rows():
    done = subprocess.run([sys.executable, "benchmarks/baselines.py", "--rows", "si_split"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "--rows: no row ['si_split']" in done.stderr and "si_split_mnist_task" in done.stderr


def test_baselines_smoke(smoke):
    result = smoke.result("baselines")
    assert set(result) == {"rows", "rehearsal_vs_avalanche_replay_speedup", "workers", "smoke"}
    names = [row["name"] for row in result["rows"]]
    assert names and len(set(names)) == len(names) and "rehearsal_split_mnist_class" in names
    for row in result["rows"]:
        assert set(row) == {"name", "target", "mean", "std", "seconds", "avalanche_seconds",
                            "avalanche_acc", "seeds", "per_seed"}, row  # fmt: skip
        assert score(row["mean"]) and score(row["avalanche_acc"]), row["name"]
        assert row["target"] is None or score(row["target"])
        assert positive(row["seconds"]) and positive(row["avalanche_seconds"])
        assert row["seeds"] == 1 and row["std"] == 0 and row["per_seed"] == {"0": row["mean"]}
    assert positive(result["rehearsal_vs_avalanche_replay_speedup"])
    assert result["workers"] == (os.cpu_count() or 1)  # the Ray pool, on this machine's cores
    assert result["smoke"] is True


def test_overhead_smoke(smoke):
    result = smoke.result("overhead")
    pairs = {"naive_vs_bare", "rehearsal_vs_bare", "avalanche_naive_vs_forgetless",
             "avalanche_replay_vs_forgetless", "avalanche_naive_vs_bare",
             "avalanche_replay_vs_bare"}  # fmt: skip
    met = {f"{k}_target_met" for k in ("naive", "rehearsal", "avalanche_naive",
                                       "avalanche_replay", "mlflow_share")}  # fmt: skip
    per_system = {"train_s", "eval_s", "train_cpu_s", "train_s_all", "final_avg_acc"}
    assert set(result) == pairs | met | per_system | {
        "mlflow_share", "cpu_ratios", "min_ratios", "mlflow", "targets", "smoke", "config"
    }  # fmt: skip
    assert all(positive(result[k]) for k in pairs)
    assert set(result["cpu_ratios"]) == set(result["min_ratios"]) == pairs
    systems = {"bare_naive", "bare_replay", "fl_naive", "fl_rehearsal", "av_naive", "av_replay"}
    for key in per_system:
        assert set(result[key]) == systems, key
    assert all(positive(t) for t in result["train_s"].values())
    assert all(score(a) for a in result["final_avg_acc"].values())
    assert score(result["mlflow_share"]) and result["mlflow_share"] > 0
    assert set(result["mlflow"]) == {"naive", "rehearsal"}
    for cell in result["mlflow"].values():
        assert 0 < cell["share"] < 1 and positive(cell["wall_s"])
        # Every timed call was found and called: the tracker's, the figure, the checkpoint.
        for key in ("start_s", "finish_s", "figure_draw_s", "checkpoint_s"):
            assert positive(cell[key]), key
    assert result["config"]["n_experiences"] == 2 and result["config"]["rounds"] == 1


def test_compressed_replay_smoke(smoke):
    result = smoke.result("compressed_replay")
    per_budget = {"acc_pq", "acc_latent", "acc_raw", "acc_pq_score_decoded", "acc_pq_minus_raw",
                  "samples_ratio_per_budget", "budgets_bytes"}  # fmt: skip
    assert set(result) == per_budget | {
        "samples_per_byte_ratio", "acc_std", "samples", "memory_bytes_max",
        "raw_bytes_per_sample", "reconstruction_mse", "relative_reconstruction_error",
        "pq_config", "joint_upper_bound", "latent_upper_bound", "samples_ratio_met",
        "beats_raw_at_every_budget", "targets", "smoke", "config",
    }  # fmt: skip
    budgets = result["budgets_bytes"]
    assert budgets and all(len(result[k]) == len(budgets) for k in per_budget)
    for key in ("acc_pq", "acc_latent", "acc_raw", "acc_pq_score_decoded"):
        assert all(score(a) for a in result[key]), key
    assert score(result["joint_upper_bound"]) and score(result["latent_upper_bound"])
    assert result["raw_bytes_per_sample"] == [65]
    for method in ("pq", "latent", "raw"):
        assert all(n > 0 for n in result["samples"][method])
        assert all(0 < m <= b for m, b in zip(result["memory_bytes_max"][method], budgets))
    assert result["samples_per_byte_ratio"] > 1  # PQ codes are smaller than raw digits
    assert result["reconstruction_mse"] >= 0 and result["relative_reconstruction_error"] >= 0
    assert result["smoke"] is True and result["config"]["seeds"] == [0]


EDIT_SCORES = {f"{s}{k}" for s in ("reliability", "generalization", "locality")
               for k in ("", "_token_acc")}  # fmt: skip


def test_editing_smoke(smoke):
    result = smoke.result("editing")
    base = {"base_trained_acc", "base_paraphrase_acc", "base_locality_acc"}
    assert set(result) == base | {"T1", "T2", "smoke"}  # a full run: T1, T10, T100
    assert all(score(result[k]) for k in base)
    for edits in ("T1", "T2"):
        assert set(result[edits]) == {"ft_l", "grace", "wise"}
        for method, scores in result[edits].items():
            assert set(scores) == EDIT_SCORES | {"edit_latency_s", "memory_bytes"}, scores
            assert all(score(scores[k]) for k in EDIT_SCORES), (edits, method)
            assert positive(scores["edit_latency_s"])
    assert result["T1"]["grace"]["memory_bytes"] > 0  # GRACE's codebook


def test_larimar_smoke(smoke):
    result = smoke.result("larimar")
    assert set(result) == {
        "edits", "speedup_vs_ft_l", "speedup_vs_wise", "reliability", "generalization",
        "locality", "forget_success", "per_editor", "baselines_from", "larimar_params", "smoke",
    }  # fmt: skip
    assert result["edits"] == 2 and result["baselines_from"] is None
    assert positive(result["speedup_vs_ft_l"]) and positive(result["speedup_vs_wise"])
    assert set(result["per_editor"]) == {"larimar", "ft_l", "wise"}
    for name, editor in result["per_editor"].items():
        assert positive(editor["seconds_per_edit"]) and editor["setup_s"] >= 0, name
        assert all(score(editor[k]) for k in ("reliability", "generalization", "locality"))
    larimar = result["per_editor"]["larimar"]
    assert larimar["forgotten"] >= 1  # forget_after 1 over 2 edits forgets edit 0
    assert all(score(larimar[k]) for k in ("forget_success", "kept_reliability", "kept_locality"))


def test_lm_overhead_smoke(smoke):
    result = smoke.result("lm_overhead")
    assert set(result) == {
        "step_vs_bare", "step_vs_bare_target_met", "bf16_loss_gap", "bf16_gap_target_met",
        "forgetless_step_s", "bare_step_s", "step_s_all", "max_weight_diff",
        "bf16_step_vs_fp32", "precision", "targets", "config",
    }  # fmt: skip
    assert positive(result["step_vs_bare"]) and positive(result["bf16_step_vs_fp32"])
    assert positive(result["forgetless_step_s"]) and positive(result["bare_step_s"])
    assert result["max_weight_diff"] < 1e-4  # both loops took the same steps
    assert 0 <= result["bf16_loss_gap"] < 1
    assert set(result["precision"]) == {"fp32", "bf16"}
    for run in result["precision"].values():
        assert run["finite"] is True and positive(run["held_out_loss"])
    assert result["config"]["smoke"] is True


def test_report_speed_smoke(smoke):
    result = smoke.result("report_speed")
    assert set(result) == {"compare_s", "report_s", "compare_rounds", "report_rounds",
                           "compare_cpu_s", "report_cpu_s", "targets", "targets_met",
                           "table_rows", "load_average", "config", "smoke"}  # fmt: skip
    assert all(positive(result[k]) for k in ("compare_s", "report_s", "compare_cpu_s",
                                             "report_cpu_s"))  # fmt: skip
    assert len(result["compare_rounds"]) == len(result["report_rounds"]) == 1
    assert result["targets"] == {"compare_s": 2.0, "report_s": 5.0}
    assert result["table_rows"] == 2  # naive and rehearsal: the commands read the built store
    assert result["smoke"] is True and result["config"]["rounds"] == 1
