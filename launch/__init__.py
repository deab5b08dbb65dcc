"""Launchers: local multi-process (local.py), Cloud TPU VM pods (tpu_vm.py), GKE JobSet/XPK (gke.py)."""
