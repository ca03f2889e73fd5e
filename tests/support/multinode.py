"""A multi-node Ray cluster on one machine for the node-loss tests (and benchmarks/fault_recovery.py):
a head that runs no work (0 CPUs: the drivers, Serve's controller and proxy, Train's controller)
and worker nodes, each its own raylet and object store, that can be killed with remove_node, as a
spot reclaim or the OOM killer would.

The workers' CPUs are logical: 2 per node on this 2-core machine, while every task, actor and
replica asks for a fraction of one, so one node left can carry the whole job."""

from __future__ import annotations

import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER_NODES = 2
WORKER_CPUS = 2
# A lost node is noticed after health_check_failure_threshold missed checks, period apart (Ray's
# defaults: about 15 s; a test should not wait that long, a cluster might).
HEALTH_CHECK = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


class MultiNodeCluster:
    """ray.cluster_utils.Cluster with helpers: where an actor runs, kill that node, add one back."""

    def __init__(self, worker_nodes: int = WORKER_NODES, worker_cpus: int = WORKER_CPUS):
        from ray.cluster_utils import Cluster

        self.worker_cpus = worker_cpus
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "_system_config": HEALTH_CHECK})
        for _ in range(worker_nodes):
            self.add_worker()
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self):
        return self.cluster.add_node(num_cpus=self.worker_cpus, object_store_memory=100 * 1024 * 1024)

    def connect(self, **runtime_env_vars: str) -> None:
        import ray

        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "FACEDIST_MODEL_DIR": os.environ["FACEDIST_MODEL_DIR"], **runtime_env_vars}
        ray.init(address=self.address, log_to_driver=False, runtime_env={"env_vars": env})

    def worker_node_ids(self) -> dict[str, object]:
        return {node.node_id: node for node in self.cluster.worker_nodes}

    @staticmethod
    def actor_nodes(class_name_part: str) -> dict[str, int]:
        """{node id: live actors whose class name contains class_name_part}, from the GCS table."""
        import ray

        nodes: dict[str, int] = {}
        for actor in ray._private.state.actors().values():
            if actor["State"] == "ALIVE" and class_name_part in actor["ActorClassName"]:
                node = actor["Address"]["NodeID"]
                nodes[node] = nodes.get(node, 0) + 1
        return nodes

    def wait_for_actor_nodes(self, class_name_part: str, count: int = 1, timeout: float = 120.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.actor_nodes(class_name_part)
            if sum(nodes.values()) >= count:
                return nodes
            assert time.monotonic() < deadline, f"fewer than {count} live {class_name_part} actors"
            time.sleep(0.1)

    def kill_worker_node(self, node_id: str) -> float:
        """remove_node without a graceful shutdown (SIGKILL); returns when it was killed (monotonic)."""
        node = self.worker_node_ids()[node_id]
        killed = time.monotonic()
        self.cluster.remove_node(node, allow_graceful=False)
        return killed

    def kill_node_holding(self, class_name_part: str, avoid: tuple[str, ...] = ()) -> tuple[str, float]:
        """Kill a worker node that runs a live actor of that class and none of the `avoid` ones."""
        busy = self.actor_nodes(class_name_part)
        avoided = {n for part in avoid for n in self.actor_nodes(part)}
        candidates = [n for n in busy if n in self.worker_node_ids() and n not in avoided]
        assert candidates, f"no worker node holds {class_name_part} without {avoid}: {busy}, {avoided}"
        return candidates[0], self.kill_worker_node(candidates[0])

    def restore(self, worker_nodes: int = WORKER_NODES) -> None:
        """Add worker nodes until there are worker_nodes again (what an autoscaler would do)."""
        while len(self.cluster.worker_nodes) < worker_nodes:
            self.add_worker()
        self.cluster.wait_for_nodes()

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """condition()'s first truthy value; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
