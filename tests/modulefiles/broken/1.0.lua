-- Test modulefile for the nersc_provisioner test rig (scripts/test-rig): never loads.
LmodError("broken/1.0: this modulefile fails on purpose (test rig)")
