"""A real Ray cluster of two nodes on this machine, started as a user starts one: `ray start
--head` with the custom resource {"rollout_node": 1}, `ray start --address` with
{"learner_node": 1}. `python -m rl.train` joins it (RAY_ADDRESS or ray.address) with
ray.rollout_resources / ray.learner_resources, so the rollout actor runs on one node and the
learner on the other, and every step's weights cross between them (object store, and the gloo
broadcast); `ray job submit` runs the same training through the head's job API.

The machine is shared (other Ray runs may be going on), so the cluster is kept to itself:
- its own temp dir: `ray start` writes the cluster's address (ray_current_cluster) there, not
  in /tmp/ray, so a `ray.init()` elsewhere on this machine does not join this cluster;
- its own ports (free ones, not Ray's fixed 6379 / 8265 / 10001 / 52365);
- token authentication with a token of its own (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH);
- stopped by signalling exactly the processes it started: each `ray start --block`, its
  descendants (GCS, raylets, agents, workers), and anything else carrying its token path in
  its environment. Never `ray stop`, which ends every Ray on the machine.
The driver-side checks (placement, the path check) run in subprocesses, not in pytest's own
process, whose Ray state earlier tests may have set.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REWARD_FILE = "def variety(prompt, completion, answer=None, **kwargs):\n    return len(set(completion)) / 10.0\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _dashboard_missing() -> str | None:
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as e:
        return f"the job API needs ray[default] ({e}): pip install -e '.[cluster]' (scripts/setup.sh installs it)"
    return None


class LocalCluster:
    """Ray nodes started with `ray start --block`, each in a process group of its own."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="rlc", dir="/tmp"))  # short: Ray's Unix sockets live here
        token = self.dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        # `python` in a job's entrypoint is the project's (the job runs in the raylet's environment)
        self.env = {**env, "PATH": f"{BIN}:{env.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
        self.procs: list[subprocess.Popen] = []
        self.address = None
        self.dashboard = None

    def _start(self, name: str, *args: str) -> None:
        log = open(self.dir / f"{name}.log", "w")
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        deadline = time.time() + 120
        while "Ray runtime started" not in (self.dir / f"{name}.log").read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start ({name}) failed:\n{(self.dir / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def _ports(self) -> list[str]:
        """A node's own agent ports: Ray's defaults (52365, ...) may be taken by another Ray here."""
        return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                "--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=200000000"]

    def start_head(self, resources: dict, dashboard: bool) -> None:
        self.dashboard_port = _free_port()
        self._start("head", "--head", f"--port={_free_port()}", f"--temp-dir={self.dir}", "--num-cpus=2",
                    f"--resources={json.dumps(resources)}", f"--include-dashboard={str(dashboard).lower()}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                    f"--ray-client-server-port={_free_port()}", *self._ports())
        self.address = (self.dir / "ray_current_cluster").read_text().strip()  # what `ray start` wrote
        if dashboard:
            self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def add_node(self, resources: dict) -> None:
        """A worker node with a temp dir of its own, as on a machine of its own: nodes that shared
        one would share the runtime-env agents' unpacked working dirs, and one agent replacing
        a job's copy pulls the directory from under the job's driver."""
        name = f"node{len(self.procs)}"
        self._start(name, f"--address={self.address}", f"--temp-dir={self.dir / name}", "--num-cpus=2",
                    f"--resources={json.dumps(resources)}", *self._ports())

    def python(self, code: str, timeout: int = 300) -> subprocess.CompletedProcess:
        """A driver of this cluster, in a process of its own."""
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=REPO, env={**self.env, "RAY_ADDRESS": self.address})

    def nodes(self) -> dict[str, dict]:
        """{node id: resources} of the alive nodes, as Ray reports them."""
        proc = self.python(textwrap.dedent("""
            import json, ray
            ray.init(logging_level="ERROR")
            print("NODES " + json.dumps({n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}))
        """), timeout=120)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("NODES ")), None)
        assert line, proc.stderr[-3000:]
        return json.loads(line[len("NODES "):])

    def ours(self) -> list[psutil.Process]:
        """Every process this cluster started: the `ray start`s and their descendants, and any
        process that inherited this cluster's token path (a worker re-parented elsewhere)."""
        found = {}
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                for p in [root] + root.children(recursive=True):
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        mark = str(self.dir)
        for p in psutil.process_iter():
            try:
                if p.pid not in found and mark in p.environ().get("RAY_AUTH_TOKEN_PATH", ""):
                    found[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return list(found.values())

    def stop(self) -> list[str]:
        """End this cluster's processes (SIGTERM, then SIGKILL after 15 s); returns any left."""
        procs = self.ours()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for proc in self.procs:
            proc.wait(timeout=10)
        left = [f"{p.pid} {p.name()}" for p in self.ours() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(self.dir, ignore_errors=True)
        return left


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start_head({"rollout_node": 1}, dashboard=_dashboard_missing() is None)
        c.add_node({"learner_node": 1})
        deadline = time.time() + 60
        while len(c.nodes()) < 2 and time.time() < deadline:
            time.sleep(1)
        c.by_resource = {r: nid for nid, res in c.nodes().items() for r in ("rollout_node", "learner_node") if r in res}
        assert set(c.by_resource) == {"rollout_node", "learner_node"}, c.nodes()
        assert c.by_resource["rollout_node"] != c.by_resource["learner_node"]
        yield c
    finally:
        left = c.stop()
        assert left == [], f"processes of the test cluster still running: {left}"


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster_reward") / "reward.py"
    path.write_text(REWARD_FILE)
    return path


def _train_args(model_dir, reward_file, run_dir, *overrides) -> list[str]:
    return ["-m", "rl.train", "configs/quickstart.yaml", f"model.path={model_dir}", "model.dtype=float32",
            "data.prompts_per_step=3", "data.max_prompt_tokens=64", "rollout.group_size=4",
            "rollout.max_new_tokens=12", "rollout.gpu_memory_utilization=0.05",
            f"reward.functions=[{{path: '{reward_file}:variety'}}]", "reward.workers=1",
            "learner.micro_batch_tokens=512", "trainer.total_steps=2", "trainer.checkpoint_every=0",
            "trainer.eval_every=0", f"trainer.output_dir={run_dir}",
            "ray.rollout_resources={rollout_node: 1}", "ray.learner_resources={learner_node: 1}", *overrides]


def _check_run(run_dir: Path, cluster: LocalCluster) -> None:
    where = json.loads((run_dir / "placement.json").read_text())
    rollout, learner = where["rollout"], where["learner"]
    assert [a["rank"] for a in rollout] == [0] and [a["rank"] for a in learner] == [0]
    assert rollout[0]["node_id"] == cluster.by_resource["rollout_node"], where
    assert learner[0]["node_id"] == cluster.by_resource["learner_node"], where
    assert rollout[0]["node_id"] != learner[0]["node_id"]  # the same IP here: nodes told apart by id
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sync/max_logprob_diff"] < 1e-3, row  # float32: the canary check passed across nodes
        assert row["sync/bytes"] > 100_000 and row["grad_norm"] > 0


@pytest.mark.parametrize("weight_sync, how", [("object_store", "RAY_ADDRESS"), ("broadcast", "ray.address")])
def test_train_on_two_nodes(cluster, tiny_model_dir, reward_file, tmp_path, weight_sync, how):
    """Rollout actor on the rollout_node node, learner on the learner_node node; weights cross
    through the object store (object_store) or a gloo group spanning the nodes (broadcast)."""
    run_dir = tmp_path / "run"
    extra = [f"rollout.weight_sync={weight_sync}"]
    env = dict(cluster.env)
    if how == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = cluster.address
    else:
        extra += [f"ray.address={cluster.address}", "ray.placement_strategy=STRICT_SPREAD"]
    proc = subprocess.run([sys.executable, *_train_args(tiny_model_dir, reward_file, run_dir, *extra)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    _check_run(run_dir, cluster)


def test_unplaceable_request_stops_with_what_was_asked_and_what_the_cluster_has(cluster, tiny_model_dir,
                                                                               reward_file, tmp_path):
    args = _train_args(tiny_model_dir, reward_file, tmp_path / "run", "ray.learner_resources={gpu_node: 1}",
                       "ray.placement_timeout_s=5")
    t0 = time.time()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**cluster.env, "RAY_ADDRESS": cluster.address})
    assert proc.returncode == 2, proc.stderr[-4000:]
    err = proc.stderr
    assert "ray.placement_timeout_s = 5 s" in err and "'gpu_node'" in err  # what was asked for
    assert "rollout_node: 1" in err and "learner_node: 1" in err and "2 node(s)" in err  # what there is
    assert "Fix:" in err and "Traceback" not in err
    assert time.time() - t0 < 120


def test_model_path_missing_on_the_actors_node_names_node_and_path(cluster, tmp_path):
    """The rollout and learner actors check their model path on their own node before loading.
    (One machine's nodes share a disk, so the path is missing for the driver too; the driver's
    own check is skipped here by creating the actors directly, as rl/actors.py does.)"""
    missing = str(tmp_path / "not_on_this_node")
    code = textwrap.dedent(f"""
        import dataclasses, json, ray
        from rl.actors import LearnerActor, RolloutActor
        from rl.config import load_config
        from rl.errors import raised_in_actor
        ray.init(logging_level="ERROR")
        c = load_config(None, [])
        rollout = RolloutActor.options(num_cpus=0, resources={{"rollout_node": 1}}).remote(
            {missing!r}, c.rollout, dtype="float32", max_model_len=64, seed=0)
        learner = LearnerActor.options(num_cpus=0, resources={{"learner_node": 1}}).remote(
            dataclasses.replace(c.model, path={missing!r}), c.learner, c.objective)
        out = {{}}
        for name, actor in (("rollout", rollout), ("learner", learner)):
            try:
                ray.get(actor.where.remote())
                out[name] = None
            except Exception as e:
                out[name] = raised_in_actor(e) or repr(e)[-2000:]
        print("ERRORS " + json.dumps(out))
    """)
    proc = cluster.python(code)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ERRORS ")), None)
    assert line, proc.stderr[-4000:]
    errors = json.loads(line[len("ERRORS "):])
    for name, resource in (("rollout", "rollout_node"), ("learner", "learner_node")):
        message = errors[name]
        assert message and f"model.path = {missing!r} does not exist on node" in message, errors
        assert cluster.by_resource[resource] in message  # the node the actor was placed on, by id


def test_run_stops_naming_node_and_path_when_the_model_is_gone_on_the_actors_node(cluster, tiny_model_dir, tmp_path):
    """End to end through the CLI: the driver checks model.path and finds it; the reward module,
    which preflight imports next, removes it (standing in for a node whose disk lacks it); the
    rollout actor's check on its node stops the run: one line naming node and path, exit 2."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    reward = tmp_path / "vanishing_reward.py"
    reward.write_text(f"import os, shutil\nif os.path.isdir({str(model)!r}):\n    shutil.rmtree({str(model)!r})\n"
                      + REWARD_FILE)
    args = _train_args(model, reward, tmp_path / "run")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**cluster.env, "RAY_ADDRESS": cluster.address})
    assert proc.returncode == 2, proc.stderr[-4000:]
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("error: "))
    assert line.startswith(f"error: model.path = {str(model)!r} does not exist on node "
                           f"{cluster.by_resource['rollout_node']} ("), line
    assert "Traceback" not in proc.stderr


def test_ray_job_submit(cluster, tiny_model_dir, reward_file, tmp_path):
    """`ray job submit --working-dir .` (the repository, without .venv/outputs/.git) runs the
    training as a job on the cluster; its exit status is the job's."""
    missing = _dashboard_missing()
    if missing:
        pytest.skip(missing)
    run_dir = tmp_path / "run"
    runtime_env = {"excludes": [".git", ".venv", "outputs", "*.egg-info", ".pytest_cache"]}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--", "python",
           *_train_args(tiny_model_dir, reward_file, run_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=cluster.env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "step 2: reward" in proc.stdout  # the job's log, streamed by `ray job submit`
    _check_run(run_dir, cluster)
    job = re.search(r"raysubmit_\w+", proc.stdout).group(0)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", cluster.dashboard, job],
                          capture_output=True, text=True, timeout=60, env=cluster.env)
    assert logs.returncode == 0 and "step 2: reward" in logs.stdout
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", cluster.dashboard, job],
                            capture_output=True, text=True, timeout=60, env=cluster.env)
    assert status.returncode == 0 and f"Job '{job}' succeeded" in status.stdout
    # a run that fails (here: a config error, exit 2) fails the job, and `ray job submit` with it
    bad = subprocess.run(cmd + ["ray.placement_strategy=NOPE"], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env=cluster.env)
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "ray.placement_strategy = 'NOPE' is not valid" in bad.stdout and "failed" in bad.stdout
