"""`bul cluster`: BUL on Ray Serve, N engine replicas behind one API (see docs/cluster.md).

A thin shim above the server, like the others: it parses, calls the engine and the server's app, and
shapes the answer; the routing decisions are `bulk.routing`'s. Its modules:

- `bulk.cluster.app`: the Serve application (the engine deployment, the ingress serving
  `bulk.server.app.create_app` over `RayEngineClient`), and `build_app`, a Serve config's
  `import_path: bulk.cluster.app:build_app`;
- `bulk.cluster.router`: the request routers Serve runs in the ingress (prefix-aware, power-of-two);
- `bulk.cluster.settings`: `ClusterSettings` (`BUL_RAY_*`), readable without Ray;
- `bulk.cluster.cli`: the `bul cluster` command.

Nothing is imported here, so that `bulk.cluster.settings` and `bul --help` load no Ray; import the
module you use. Nothing below this package imports it (`bulk.server`, `bulk.integrations`): the
import-linter contracts of `pyproject.toml` keep it so."""
