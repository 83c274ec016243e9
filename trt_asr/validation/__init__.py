"""Validation of encoder engines against the fp32 reference: reference streams, streaming parity (functional and
closed-loop) with gates, and the error-trend (stability) analysis."""
