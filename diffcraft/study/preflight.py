"""Before any trial starts: can this cluster run the study at all, and can every node reach what a
trial needs? Resources are judged per node (a worker's bundle must fit on one node), and one tiny
task per alive node reads the feature cache, writes the storage location and asks the tracking
server. Every problem is one line naming the node and what it could not do.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from diffcraft.study.config import StudyConfig

PROBE_TIMEOUT_S = 120.0


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)  # each one stops the study
    notes: list[str] = field(default_factory=list)  # worth saying, not fatal
    nodes: list[str] = field(default_factory=list)  # one line per node that passed

    @property
    def ok(self) -> bool:
        return not self.problems


def node_label(node: dict) -> str:
    return f"node {node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"


def _autoscaling(ray) -> bool:
    """Whether an autoscaler can add nodes to this cluster. Every cluster publishes a status in the
    GCS; on a fixed one (`ray start`, `ray.init`) its monitor is read-only and names each node's
    type `node_<its id>`, while a launcher or KubeRay autoscaler names the configured node types."""
    try:
        import json

        from ray.experimental.internal_kv import _internal_kv_get

        status = _internal_kv_get("__autoscaling_status")
        mapping = json.loads(status)["autoscaler_report"]["node_type_mapping"] if status else {}
    except Exception:  # noqa: BLE001 - no readable status: assume a fixed cluster
        return False
    return any(kind != f"node_{node}" for node, kind in (mapping or {}).items())


def check_resources(study: StudyConfig, nodes: list[dict], autoscaling: bool, report: Preflight) -> None:
    """One worker's bundle must fit on some node, and a trial's workers on the cluster together."""
    r = study.resources
    need = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
    fits = [n for n in nodes if all(n["Resources"].get(k, 0.0) >= v for k, v in need.items() if v)]
    have = ", ".join(f"{node_label(n)}: {n['Resources'].get('CPU', 0):g} CPU, {n['Resources'].get('GPU', 0):g} GPU"
                     for n in nodes)
    total_cpu = sum(n["Resources"].get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n["Resources"].get("GPU", 0.0) for n in nodes)
    problem = None
    if not fits:
        problem = (f"resources: one worker needs {r.cpus_per_worker:g} CPU and {r.gpus_per_worker:g} GPU on one node, "
                   f"and no node has that ({have})")
    elif r.workers * r.cpus_per_worker > total_cpu or r.workers * r.gpus_per_worker > total_gpu:
        problem = (f"resources: one trial needs {r.workers * r.cpus_per_worker:g} CPUs and "
                   f"{r.workers * r.gpus_per_worker:g} GPUs ({r.workers} worker(s) x {r.cpus_per_worker:g} CPU, "
                   f"{r.gpus_per_worker:g} GPU), but the Ray cluster has {total_cpu:g} CPUs and {total_gpu:g} GPUs "
                   f"in all ({have}): it could never start")
    if problem and autoscaling:
        report.notes.append(problem + "; this cluster autoscales, so the trials wait for the nodes it adds")
    elif problem:
        report.problems.append(problem)


def probe_node(cache: str, storage: str, tracking_uri: str) -> list[str]:
    """Runs on one node: what it cannot reach, one phrase each."""
    from diffcraft.model_uri import tracking_client

    from diffcraft.data.cache import read_manifest
    from diffcraft.storage import Location, probe_writable

    problems = []
    try:
        if read_manifest(Location.of(cache)) is None:
            problems.append(f"finds no feature cache at {cache}")
    except Exception as err:  # noqa: BLE001 - any failure is the finding
        problems.append(f"cannot read the feature cache {cache} ({str(err).splitlines()[0]})")
    try:
        probe_writable(Location.of(storage))
    except Exception as err:  # noqa: BLE001
        problems.append(f"cannot write the storage {storage} ({str(err).splitlines()[0]})")
    try:
        tracking_client(tracking_uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001
        problems.append(f"cannot reach the MLflow tracking server {tracking_uri} ({str(err).splitlines()[0][:200]})")
    return problems


def preflight(study: StudyConfig, tracking_uri: str, ray) -> Preflight:
    """Check resources per node and what every alive node can reach (see the module docstring)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    report = Preflight()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    check_resources(study, nodes, _autoscaling(ray), report)
    probe = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    pending = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
        study.run.data.cache, study.location.uri, tracking_uri): n for n in nodes}
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=PROBE_TIMEOUT_S)
    for ref in ready:
        node = pending[ref]
        try:
            problems = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - the probe itself died on that node
            problems = [f"could not run a probe ({type(err).__name__}: {str(err).splitlines()[0][:200]})"]
        report.problems += [f"{node_label(node)} {p}" for p in problems]
        if not problems:
            report.nodes.append(f"{node_label(node)}: reads the cache, writes the storage, reaches MLflow")
    report.problems += [f"{node_label(pending[ref])} did not answer a probe within {PROBE_TIMEOUT_S:.0f} s" for ref in late]
    return report
