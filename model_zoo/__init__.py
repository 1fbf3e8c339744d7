"""lrponnx's model zoo: ``registry.list_models()``, ``registry.build(name, out_dir)``,
``registry.default_model_path()`` (the bundled, trained cifar10-lrn). See docs/model_zoo.md."""
