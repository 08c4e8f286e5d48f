"""Turn instruction data (hub id or local file, any common format) into Mistral token ids with responses-only labels,
or preference pairs (a prompt, a chosen and a rejected answer) into the prompt's and each answer's ids, for DPO and
ORPO (told from the rows' fields).

    python data_prep.py --dataset my_data.jsonl --output_dir data/my_data
    python data_prep.py --dataset my_pairs.jsonl --output_dir data/my_pairs
"""

from qlora.config import DATA_PREP, parse, show
from qlora.data import DataError
from qlora.errors import one_line_errors
from qlora.hub import HubError
from qlora.prepare import prepare_dataset

if __name__ == "__main__":
    config, _ = parse(DATA_PREP, __doc__)
    show(config, DATA_PREP)
    with one_line_errors(DataError, HubError):
        prepare_dataset(config, config.output_dir)
