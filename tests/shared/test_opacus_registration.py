"""Opacus loads only where DP-SGD or accounting runs, and medfed's grad samplers are registered
whichever of medfed and Opacus a process imports first (each case runs in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SAMPLERS = (
    "from torch import nn\n"
    "from opacus.grad_sample.grad_sample_module import GradSampleModule as G\n"
    "print({t.__name__: getattr(G.GRAD_SAMPLERS.get(t), '__module__', None) for t in (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)})\n"
)
FIXED = {"Conv2d": "medfed.shared.opacus_fixes", "Conv3d": "medfed.shared.opacus_fixes",
         "ConvTranspose2d": "medfed.shared.opacus_fixes"}


def _python(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_medfed_grad_samplers_register_when_opacus_loads_after_medfed() -> None:
    # Through a submodule: the hook fires on the parent package, before the submodule is looked up.
    lines = _python(f"import sys\nimport medfed.shared.models\nprint('opacus' in sys.modules)\n"
                    f"from opacus.grad_sample import GradSampleModule\n{SAMPLERS}")
    assert lines[0] == "False"  # building models does not load Opacus
    assert eval(lines[1]) == FIXED  # noqa: S307 - our own printed dict


def test_medfed_grad_samplers_replace_opacus_own_when_opacus_loaded_first() -> None:
    lines = _python(f"import opacus\n{SAMPLERS}import medfed.shared.models\n{SAMPLERS}")
    own, fixed = (eval(line) for line in lines)  # noqa: S307
    # Without medfed the registry holds Opacus's functions (so the check below can fail).
    assert own == {"Conv2d": "opacus.grad_sample.conv", "Conv3d": "opacus.grad_sample.conv", "ConvTranspose2d": None}
    assert fixed == FIXED


def test_a_failed_opacus_import_registers_on_the_next_try() -> None:
    lines = _python(
        "import sys\nimport medfed.shared.models\n"
        "sys.modules['scipy.stats'] = None  # Opacus's accountants import it: this import of Opacus fails\n"
        "try:\n    import opacus\nexcept ImportError as err:\n    print(type(err).__name__)\n"
        f"del sys.modules['scipy.stats']\nimport opacus\n{SAMPLERS}"
    )
    assert lines[0] == "ModuleNotFoundError"
    assert eval(lines[1]) == FIXED  # noqa: S307


def test_a_site_without_dp_trains_without_loading_opacus_and_dp_loads_it(tmp_path: Path) -> None:
    lines = _python(
        f"""
        import sys
        import medfed.client.client_app, medfed.server.server_app
        from medfed.shared.config import RunConfig
        from medfed.simulations.bench.quality import federate_in_process
        cfg = RunConfig(dataset="synthetic", synthetic_samples=64, image_size=12, model="simplecnn", num_sites=2,
                        num_server_rounds=1, local_epochs=1, batch_size=16, store="off", cross_site=False,
                        personalize="off", run_dir={str(tmp_path)!r})
        plain = federate_in_process(cfg)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "opacus")[:3])
        private = federate_in_process(cfg.replace(dp=True, norm="group", dp_noise_multiplier=1.0, dp_budget_epsilon=1000.0))
        print("opacus.optimizers" in sys.modules, "medfed.shared.opacus_fixes" in sys.modules)
        print(len(plain.global_metrics), len(private.global_metrics))
        """
    )
    assert lines[0] == "[]"
    assert lines[1] == "True True"
    assert lines[2] == "2 2"  # both trained: the initial model and round 1 were scored
