"""Turn instruction data (hub id or local file, any common format) into Mistral token ids with responses-only labels.

    python data_prep.py --dataset my_data.jsonl --output_dir data/my_data
"""

from qlora.config import DATA_PREP, parse, show
from qlora.data import DataError, prepare_dataset
from qlora.errors import one_line_errors
from qlora.hub import HubError

if __name__ == "__main__":
    config, _ = parse(DATA_PREP, __doc__)
    show(config, DATA_PREP)
    with one_line_errors(DataError, HubError):
        prepare_dataset(config, config.output_dir)
