"""The paper's experiments as thin tools: data format + metric; models, scoring and sampling are reused."""
