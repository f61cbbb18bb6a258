"""Experiment tools run on the operator's host, outside the ServerApp and the ClientApps (nothing
they run imports this package): ``layercam-sweep`` (``experiments.sweep``) runs a grid of
``flwr run`` experiments, ``layercam-report`` (``experiments.report``) turns their results
folders into tables and plots, and ``experiments.federation`` runs a federation's rounds in one
process for the benchmarks and the tests."""
