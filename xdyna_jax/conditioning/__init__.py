"""Conditioning inputs: reference-image preprocessing for IP-Adapter and the ControlNets."""
