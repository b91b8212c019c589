"""Fault injection: a stack of its own, a load generator, faults, and a checker of the promises."""
