-- Test modulefile for the nersc_provisioner test rig (scripts/test-rig).
whatis("nersc-test 2.0: test-rig module")
setenv("NERSC_TEST_MODULE", "nersc-test-2.0")
prepend_path("NERSC_TEST_PATH", "/opt/nersc-test-2.0")
