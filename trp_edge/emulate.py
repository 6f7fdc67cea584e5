"""Placeholder replaced below."""
def can_emulate(target):
    return "emulation not yet available"
def run_check(job, folder, target):
    raise NotImplementedError
