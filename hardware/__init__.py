"""GPU, interconnect and model specs, the step operator list and its roofline cost."""
