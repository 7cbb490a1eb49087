"""Infinite Sampling scheduling, pure Python: length prediction, FPTAS packing, SJF refill, simulator."""
