"""Sampling: sigma schedules, samplers (steps of the compiled loop) and the spec's scheduler names."""
