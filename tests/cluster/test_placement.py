"""The engine deployment's placement: `max_replicas_per_node` (`BUL_RAY_MAX_REPLICAS_PER_NODE`, a Serve
config's `args`) reaches Serve's deployment options; unset, Serve's own default (no limit) stays.
Builds the application only: no Ray instance is started."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")
from ray.serve.schema import ServeDeploySchema

from bulk.cluster.app import ENGINE_DEPLOYMENT, build_app, bul_application
from bulk.cluster.settings import ClusterSettings


def _engine_deployment(app):
    # The ingress is bound to the engine deployment's application (its first argument).
    engine = app._bound_deployment.init_args[0]._bound_deployment
    assert engine.name == ENGINE_DEPLOYMENT
    return engine


def test_max_replicas_per_node_reaches_the_engine_deployment():
    engine = _engine_deployment(build_app({"replicas": 2, "max_replicas_per_node": 1}))
    assert engine.num_replicas == 2
    assert engine._replica_config.max_replicas_per_node == 1


def test_no_placement_limit_by_default(monkeypatch):
    monkeypatch.delenv("BUL_RAY_MAX_REPLICAS_PER_NODE", raising=False)
    assert ClusterSettings().max_replicas_per_node is None
    assert (
        _engine_deployment(bul_application(ClusterSettings()))._replica_config.max_replicas_per_node is None
    )


def test_the_variable_and_the_serve_config_set_it(monkeypatch):
    monkeypatch.setenv("BUL_RAY_MAX_REPLICAS_PER_NODE", "1")
    assert ClusterSettings().max_replicas_per_node == 1
    with pytest.raises(ValueError):
        ClusterSettings(max_replicas_per_node=0)
    config = {
        "applications": [
            {
                "name": "bul",
                "import_path": "bulk.cluster.app:build_app",
                "args": {"replicas": 2, "max_replicas_per_node": 1},
            }
        ]
    }
    ServeDeploySchema.model_validate(config)
    assert ClusterSettings(**config["applications"][0]["args"]).max_replicas_per_node == 1
