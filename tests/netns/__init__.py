"""Hosts in network namespaces for tests that need separate addresses and real partitions."""
