"""The cluster plane: a local multi-node dev cluster, job submission through the Ray Jobs API, and `ember status`.

Everything here talks to Ray the way Ray's own tools do: the dashboard's HTTP APIs (Jobs, State, Serve) with the
cluster's token, so a client needs only the dashboard URL and the token, never a connection to the GCS.
"""
