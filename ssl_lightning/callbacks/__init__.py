"""Callbacks: throughput, figures and checkpoint safety."""
