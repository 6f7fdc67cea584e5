"""What runs on the device: loading and running artifacts (numpy and the runtimes only, no torch)."""
