"""The Wyckoff grammar of crystals as token sequences (`tokenizer`) and the masks that keep sampled ones valid (`masks`)."""
