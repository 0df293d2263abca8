"""The `lm` experiment: Mamba on synthetic selective copying / MQAR."""
