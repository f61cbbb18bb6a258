"""The fields a ClientApp's train reply carries beside its model and training metrics, for the
ServerApp's harness only: the ClientApp (``client_app.app``) writes them, the harness
(``server_app.eavesdrop``) reads them and takes them out of every reply before a strategy sees
it. The two apps may not import each other; both import these names."""

ATTACKER = "attacker"
"""Metric: 1.0 from an attacking client, 0.0 from a benign one (the ground truth of the
detection metrics)."""

AWAITS_BENIGN = "awaits-benign"
"""Metric: 1.0 from an eavesdropping attacker whose reply is a placeholder, waiting for the
round's benign uploads to craft its model from."""

HARNESS_METRICS = (ATTACKER, AWAITS_BENIGN)
"""The metrics only the harness reads."""

RUNTIME = "runtime"
"""ConfigRecord naming where the reply was made: ``RAY_NODE``."""

RAY_NODE = "ray-node"
"""The id of the Ray node a simulated ClientApp ran on."""
