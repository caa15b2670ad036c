"""Device profiles, the fit check and bundles (installed as ``edgeqlora.devices``).

Torch-free: imports ``edgeqlora.runtimes`` at most, never the trainer.

- ``profiles``: ``load_profile(name_or_path)``, ``load_profiles("all")``, ``host_profile()``;
  the shipped TOML profiles are in ``profiles/*.toml``.
- ``fit``: ``model_facts(export_or_gguf)``, ``fit(facts, profile, context)`` -> ``FitResult``,
  ``pick_quant(candidates, profile, context)`` -> ``QuantChoice``.
- ``bundle``: ``create_bundle``, ``verify_bundle``, ``unpack_bundle``.
- ``measure``: resident memory of the runtime shim, to check the fit model.
- ``raspberry-pi/``, ``android/``: install scripts, a systemd unit and a terminal chat.
"""
