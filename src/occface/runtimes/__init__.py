"""Where the network runs besides eager PyTorch: ``export`` writes it as an ONNX graph (checked
against PyTorch), ``onnx_model`` runs that graph in ONNX Runtime behind the model's interface
(``load_face_model(model_dir, "onnx")``)."""
