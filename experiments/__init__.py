"""The measuring scripts, beside the reading path: run each from the repository root as
`python -m experiments.<script>`.
  bench        what one training step of each method costs (train.train_step itself), and its MFU
  loaderbench  what the data pipeline alone delivers (decoding, crops, batching), per CPU core
  ablate       the methods against each other over seeds, with paired differences, tables and charts
  probe        a dense linear probe of the patch features that zero-shot segmentation reads
  linprobe     linear-probe and few-shot classification on the frozen image embeddings
  curves       the training curves of one or several runs (log.jsonl) in one picture
  shortcut     how well colour and texture alone match a local crop to its own image (SILC's shortcut)
  objects      shapes8 split into images with one shape and with several: where the dense errors are"""
