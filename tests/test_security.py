"""A run keeps secrets out of its outputs, and a local Ray lets no one in.

- Keys planted in the environment (WANDB_API_KEY, HF_TOKEN, a RAY_ variable, ...) never reach
  a file under output_dir: the trainer's output writers (config.yaml as rl/trainer.py saves
  it, MetricsLogger with every tracker installed here) run in-process, then every file is
  searched for the keys' bytes. config_to_dict never carries an environment value, even one
  a YAML `${oc.env:...}` pulled in.
- (slow) A local Ray started by rl.train.init_ray listens on the loopback interface only.
"""

import ipaddress
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rl.config import config_to_dict, load_config

PLANTED = {
    "WANDB_API_KEY": "planted-wandb-6f1e2d3c4b5a69788796a5b4c3d2e1f0a1b2c3d4",
    "HF_TOKEN": "hf_plantedTokenAbCdEfGhIjKlMnOpQrStUvWxYz012",
    "RAY_AUTH_TOKEN": "planted-ray-0a9b8c7d6e5f40312233445566778899",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-pw-1234567890abcdef",
    "OPENAI_API_KEY": "sk-planted-0123456789abcdefghijklmnopqrstuv",
}


@pytest.fixture
def planted(monkeypatch):
    for k, v in PLANTED.items():
        monkeypatch.setenv(k, v)
    return PLANTED


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _grep(root: Path, needles: list[str]) -> list[tuple[str, str]]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [(str(path), n[:12]) for n in needles if n.encode() in data]
    return hits


def test_config_to_dict_never_holds_environment_values(planted, tmp_path):
    yaml = tmp_path / "leaky.yaml"
    yaml.write_text("trainer:\n  canary_prompt: 'token ${oc.env:HF_TOKEN} here'\n"
                    "  output_dir: ${oc.env:WANDB_API_KEY}\n")
    c = load_config(yaml, [])
    assert PLANTED["HF_TOKEN"] in c.trainer.canary_prompt  # the run itself gets what was asked for
    d = config_to_dict(c)
    text = json.dumps(d)
    assert not any(v in text for v in PLANTED.values())
    assert d["trainer"]["canary_prompt"] == "token <redacted $HF_TOKEN> here"
    assert d["trainer"]["output_dir"] == "<redacted $WANDB_API_KEY>"


def test_run_outputs_hold_no_planted_key(planted, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from rl.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    loggers = ["jsonl", "tensorboard"] + [t for t in ("wandb", "mlflow") if _installed(t)]
    out = tmp_path / "run"
    # a config value that came from the environment, to check the writers' redaction too
    c = load_config(None, [f"trainer.output_dir={out}", f"trainer.loggers=[{','.join(loggers)}]",
                           "trainer.canary_prompt=${oc.env:HF_TOKEN}"])
    assert c.trainer.canary_prompt == PLANTED["HF_TOKEN"]
    out.mkdir()
    # exactly what rl/trainer.py writes
    OmegaConf.save(OmegaConf.create(config_to_dict(c)), out / "config.yaml")
    logger = MetricsLogger(out, loggers=c.trainer.loggers, run_name="leak-check", config=config_to_dict(c))
    for step in (1, 2):
        logger.log(step, {"reward/mean": 0.1 * step, "loss": 0.5, "time/step": 1.0})
    logger.log_eval(2, {"accuracy": 0.25})
    logger.close()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists() and (out / "eval.jsonl").exists()
    assert len(files) >= 4
    assert _grep(out, list(PLANTED.values())) == []


LOOPBACK_SCRIPT = textwrap.dedent("""
    import json, os, psutil, ray
    from rl.config import load_config
    from rl.train import init_ray

    init_ray(load_config(None, ["ray.num_cpus=1"]))

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self):
            return os.getpid()

    actor = Probe.remote()
    ray.get(actor.pid.remote())
    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    pids = {p.pid: p.name() for p in procs}
    rows = [(pids[c.pid], c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]
    print("LISTEN " + json.dumps({"rows": rows, "node_ip": ray.util.get_node_ip_address()}))
    ray.shutdown()
""")


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only():
    proc = subprocess.run([sys.executable, "-c", LOOPBACK_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LISTEN ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    found = json.loads(line[len("LISTEN "):])
    rows = found["rows"]
    names = {name for name, _, _ in rows}
    # the GCS, the raylet (node manager + object manager), the driver's and the actor's workers
    assert {"gcs_server", "raylet"} <= names, rows
    assert found["node_ip"] == "127.0.0.1"
    exposed = [r for r in rows if not _loopback(r[1])]
    assert exposed == [], f"Ray ports open beyond loopback: {exposed}"
