"""The Klein scheduler config the sampler tests compare diffusers against."""

# A plausible Klein `scheduler/scheduler_config.json` (flux2_klein.md §11 q2: third-party copies).
KLEIN_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
}
