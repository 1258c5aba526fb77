"""Test configuration.

The suite runs with the process's own devices (one CPU device by default).
Tests that need a device mesh start a subprocess with simulated devices.
"""
