"""Launchers: local multi-process (local.py), Cloud TPU VM pods (tpu_vm.py), GKE JobSet/XPK (gke.py); the
training flags, workdir check and environment the two pod launchers share (training.py)."""
