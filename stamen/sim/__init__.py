"""`stamen simulate`: many virtual servers placing themselves with the real placement code."""
