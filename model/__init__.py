"""The torch reference model: config, presets, the Llama-family decoder, weights, generation."""
