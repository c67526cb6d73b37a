"""Execute notebooks in place, as their committed copies are made: in fast mode unless PIXELVIT_FAST says
otherwise, top to bottom, with each cell's consecutive prints merged into one output (a print, a warning
and a print would otherwise be saved as three fragments).

    python notebooks/execute.py 01_pixel_tokens.ipynb 05_ade20k.ipynb    # no names: every notebook

Runs go where the notebooks put them (`runs/`, or $PIXELVIT_RUNS); a notebook whose miniature runs are
already there reads them back instead of training again.
"""
import argparse
import os

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def merge_streams(cell):
    """Consecutive stream outputs of one kind (stdout, stderr) joined into one."""
    merged = []
    for output in cell.outputs:
        if (merged and output.output_type == "stream" and merged[-1].output_type == "stream"
                and merged[-1].name == output.name):
            merged[-1].text += output.text
        else:
            merged.append(output)
    cell.outputs = merged


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook file names in notebooks/ (default: all)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a cell may run")
    args = parser.parse_args()
    os.environ.setdefault("PIXELVIT_FAST", "1")
    names = args.names or sorted(n for n in os.listdir(HERE) if n.endswith(".ipynb"))
    for name in names:
        path = os.path.join(HERE, os.path.basename(name))
        notebook = nbformat.read(path, as_version=4)
        NotebookClient(notebook, timeout=args.timeout, kernel_name="python3",
                       resources={"metadata": {"path": HERE}}).execute()
        for cell in notebook.cells:
            if cell.cell_type == "code":
                merge_streams(cell)
        nbformat.write(notebook, path)
        print(f"{name}: executed, {os.path.getsize(path) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
