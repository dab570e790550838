"""The synthetic sprite domain (docs/synthetic.md): ground truth for training and exact evaluation on a CPU.

Apart from the method's core: the core never imports this package. It plugs in by name (customshift/plugins.py):
``data.kind: synthetic`` (`data.SyntheticSource`) and ``model.pretrained: sprite`` (`model.build_sprite_pipeline`);
the CLI's ``evaluate synthetic``, ``demo``, ``probe`` and ``train-vae`` commands use it directly.

* `synthetic`: the generator (spec versions 1 and 2) and its exact metrics;
* `data`: the training source; `model`: the default model's shape and vocabulary; `vae`: its stage-1 VAE;
* `evaluate`: ``customshift evaluate synthetic`` and the demo grids; `probe`: the reference-use probe.
"""
