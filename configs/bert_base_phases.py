"""BERT-base with BERT's two length phases: 90% of the steps on 128-token rows, the last 10%
on 512 (configs/bert_base.py trains on 512 throughout, as RoBERTa).

    jaxlm train --config=configs/bert_base_phases.py --config.data.path='/data/books/*.jsonl' --workdir=...

The same rows per batch in both phases (README: Sequence-length phases), so a step of the
first phase has a quarter of the tokens and far less attention work; the position table is
sized for 512. Needs an accelerator, like bert_base.
"""

from jaxlm.config import based_on


def get_config():
  c = based_on(__file__, 'bert_base.py')
  c.data.phases = ((0.9, 128), (1.0, 512))
  return c
