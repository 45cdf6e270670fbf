"""runs.py, the run-folder machinery: one-line errors, the manifest that says which files the programs
wrote (and so which files --overwrite may delete), whole-file writes, the folder lock, signals."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import runs
from conftest import ROOT


def test_fail_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        runs.fail("a problem\nover two lines")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith('error: a problem over two lines')


@pytest.mark.parametrize('argv, message', [
    (['--n', '0'], '--n must be positive, got 0'),
    (['--k', '-1'], '--k must be a finite number >= 0, got -1'),
    (['--x', 'nan'], '--x must be a finite number >= 0, got nan'),
    (['--x', 'inf'], '--x must be a finite number >= 0, got inf'),
    (['--n', 'abc'], "--n invalid int value: 'abc'"),
    (['--unknown'], 'unrecognized arguments: --unknown'),
])
def test_parser_and_types_refuse_bad_values_with_one_line(argv, message, capsys):
    p = runs.parser('a program\n\nmore text')
    p.add_argument('--n', type=runs.positive, default=1)
    p.add_argument('--k', type=runs.count, default=0)
    p.add_argument('--x', type=runs.nonnegative, default=0.0)
    assert vars(p.parse_args(['--n', '3', '--k', '0', '--x', '0.5'])) == dict(n=3, k=0, x=0.5)
    with pytest.raises(SystemExit) as stop:
        p.parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_the_manifest_lists_each_path_once(tmp_path):
    root = str(tmp_path)
    assert runs.owned(root) == set()
    runs.own(root, 'a.npy', 'b/c.pt', 'a.npy')
    runs.own(root, 'b/c.pt', 'd.json')
    assert (tmp_path / runs.MANIFEST).read_text() == 'a.npy\nb/c.pt\nd.json\n'
    assert runs.owned(root) == {'a.npy', 'b/c.pt', 'd.json'}


def test_foreign_is_everything_no_program_listed(tmp_path):
    root = str(tmp_path)
    runs.own(root, 'rec.npy', 'ckpts/step_000001.pt', 'paper/steps.npy')
    for rel in ['rec.npy', 'rec.npy.tmp', 'ckpts/step_000001.pt.tmp', 'paper/steps.npy', 'notes.txt',
                'paper/mine.txt']:
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_text('x')
    (tmp_path / 'empty').mkdir()  # a folder of one's own, even an empty one
    os.symlink(tmp_path / 'rec.npy', tmp_path / 'link.npy')  # a link, even to a listed file
    os.mkfifo(tmp_path / 'fifo')
    assert runs.foreign(root) == ['empty', 'fifo', 'link.npy', 'notes.txt', 'paper/mine.txt']
    assert runs.foreign(root, 'paper') == ['paper/mine.txt']
    assert runs.foreign(root, 'ckpts') == []  # a listed file's temporary twin counts as listed


def test_remove_owned_deletes_the_listed_files_only(tmp_path):
    root = str(tmp_path)
    listed = ['rec.npy', 'ckpts/step_000001.pt', 'paper/steps.npy', 'paper_N32/steps.npy', 'figures/fig1.png']
    for rel in listed:
        runs.write_atomic(root, rel, lambda f: f.write(b'bytes'))
    (tmp_path / 'paper' / 'steps.npy.tmp').write_text('torn')
    runs.remove_owned(root, 'paper')  # measure.py --overwrite of one N: that folder's files, the folder kept
    assert sorted(os.listdir(tmp_path / 'paper')) == []
    assert runs.owned(root) == set(listed) - {'paper/steps.npy'}
    assert (tmp_path / 'paper_N32' / 'steps.npy').exists()
    runs.remove_owned(root)  # train.py --overwrite: every listed file, and the folders left empty
    assert sorted(os.listdir(tmp_path)) == [runs.MANIFEST, 'paper']  # paper/ was never a listed file's
    assert runs.owned(root) == set()
    (tmp_path / 'new').mkdir()
    runs.remove_owned(str(tmp_path / 'new'))  # a folder without a manifest: nothing to delete
    assert os.listdir(tmp_path / 'new') == []


def test_writes_are_listed_first_and_whole(tmp_path):
    root = str(tmp_path)
    runs.write_json(root, 'sub/progress.json', {'steps_done': 3})
    assert json.loads((tmp_path / 'sub' / 'progress.json').read_text()) == {'steps_done': 3}
    assert not (tmp_path / 'sub' / 'progress.json.tmp').exists()

    def torn(f):
        assert 'x.npy' in runs.owned(root)  # listed before a byte is written
        f.write(b'half')
        raise OSError('disk full')
    with pytest.raises(OSError):
        runs.write_atomic(root, 'x.npy', torn)
    assert not (tmp_path / 'x.npy').exists() and runs.foreign(root) == []  # only the listed twin is left


def test_read_json_needs_the_manifest(tmp_path, capsys):
    root = str(tmp_path)
    assert runs.read_json(root, 'config.json', 'train.py') is None
    (tmp_path / 'config.json').write_text('{"n_layer": 4}')  # a run of an older version: no manifest
    with pytest.raises(SystemExit):
        runs.read_json(root, 'config.json', 'train.py')
    assert 'made by an older version of train.py' in capsys.readouterr().err
    runs.write_json(root, 'config.json', {'n_layer': 4})
    assert runs.read_json(root, 'config.json', 'train.py') == {'n_layer': 4}
    (tmp_path / 'config.json').write_text('{"n_layer": ')
    with pytest.raises(SystemExit):
        runs.read_json(root, 'config.json', 'train.py')
    assert 'cannot read' in capsys.readouterr().err


def test_a_locked_folder_is_refused_until_its_holder_ends(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', f"import sys; sys.path.insert(0, {ROOT!r}); "
                               "import runs; "
                               f"runs.lock({str(tmp_path)!r}); print('locked', flush=True); input()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(SystemExit) as stop:
        runs.lock(str(tmp_path))
    assert stop.value.code == 2
    holder.kill()  # the kernel releases the lock however the process ends
    holder.wait()
    os.close(runs.lock(str(tmp_path)))


def test_a_signal_stops_with_one_line_and_128_plus_the_signal(capsys):
    handlers = runs.on_signals(lambda: 'continue it with --resume')
    try:
        with pytest.raises(SystemExit) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.value.code == 128 + signal.SIGTERM
        assert 'stopped by SIGTERM; continue it with --resume' in capsys.readouterr().err
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_check_device():
    assert runs.check_device('cpu') is None and runs.check_device('auto', 'bfloat16') is None
    assert 'not one of auto, cpu, cuda' in runs.check_device('tpu')


def open_folder(*args, **kwargs):
    """runs.open_folder in a program of its own, as train.py and measure.py call it: (exit status, stderr)."""
    proc = subprocess.run([sys.executable, '-c', f"import sys; sys.path.insert(0, {ROOT!r}); import runs; "
                           f"runs.open_folder(*{args!r}, **{kwargs!r})"], capture_output=True, text=True)
    return proc.returncode, proc.stderr


def test_open_folder_refuses_foreign_files_and_overwrites_only_the_listed(tmp_path):
    root = str(tmp_path / 'run')
    assert open_folder(root) == (0, '') and os.path.isdir(root)  # created
    runs.write_atomic(root, 'rec.npy', lambda f: f.write(b'x'))
    runs.write_atomic(root, 'paper/steps.npy', lambda f: f.write(b'x'))
    code, err = open_folder(root, taken='already holds a run')  # a run there: refused unless overwritten
    assert code == 2 and 'already holds a run' in err
    (tmp_path / 'run' / 'paper' / 'mine.txt').write_text('x')
    for under in ['', 'paper']:  # a file of one's own: refused even with overwrite, nothing deleted
        code, err = open_folder(root, under, overwrite=True)
        assert code == 2 and 'paper/mine.txt' in err and len(err.strip().splitlines()) == 1
        assert (tmp_path / 'run' / 'rec.npy').exists() and (tmp_path / 'run' / 'paper' / 'steps.npy').exists()
    os.remove(tmp_path / 'run' / 'paper' / 'mine.txt')
    assert open_folder(root, 'paper', overwrite=True)[0] == 0  # measure.py --overwrite: its folder only
    assert (tmp_path / 'run' / 'rec.npy').exists() and os.listdir(tmp_path / 'run' / 'paper') == []
    assert 'paper/' in runs.owned(root) and runs.foreign(root) == []  # the empty folder is measure.py's
    assert open_folder(root, overwrite=True, taken='already holds a run')[0] == 0
    assert os.listdir(tmp_path / 'run') == [runs.MANIFEST] and runs.owned(root) == set()


def help_entries(p):
    """--help's entry of each flag, on one line: {'--name': text}."""
    entries, name = {}, None
    for line in p.format_help().split('options:')[1].splitlines():
        if line.startswith('  -'):
            name = line.split()[0].rstrip(',')
        if name:
            entries[name] = ' '.join([entries.get(name, ''), line.strip()])
    return entries


def test_help_shows_each_default_once():
    import measure
    import train
    p = runs.parser('a program', [('n', 3, int, 'a size'), ('data', None, str, 'a file (default: the Bible)'),
                                  ('threads', 0, int, "threads (0: torch's default)"), ('cut', None, int, 'a cut'),
                                  ('decay', False, bool, 'decay; default: constant')])
    entries = help_entries(p)
    assert entries['--n'].endswith('a size (default: 3)') and entries['--threads'].endswith('(default: 0)')
    assert entries['--data'].endswith('a file (default: the Bible)') and entries['--cut'].endswith('a cut')
    assert entries['--decay'].endswith('decay; default: constant')
    for settings in [train.SETTINGS, measure.SETTINGS]:  # every program's flags
        for name, text in help_entries(runs.parser('a program', settings)).items():
            assert text.count('default:') <= 1 and 'default: None' not in text, (name, text)


@pytest.mark.parametrize('tail', ['x/' + 'y' * 300, ('d' * 200 + '/') * 21])  # a name; a path too long
def test_check_folder_refuses_an_impossible_path_before_creating_anything(tail, tmp_path, capsys):
    assert runs.check_folder(str(tmp_path / 'a' / 'b')) == str(tmp_path)  # the nearest existing folder
    with pytest.raises(SystemExit) as stop:
        runs.check_folder(str(tmp_path) + '/' + tail)
    assert stop.value.code == 2 and 'longer than this system allows' in capsys.readouterr().err
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(SystemExit):
        runs.check_folder(str(tmp_path / 'a_file' / 'run'))
    assert 'a_file is a file, not a folder' in capsys.readouterr().err
    assert os.listdir(tmp_path) == ['a_file']


def test_check_records_refuses_a_record_not_whole_and_never_extends_it(tmp_path, capsys):
    import numpy as np
    records = {'loss': [[4, 2], 'float32'], 'offsets': [[4], 'int64']}
    for name, (shape, dtype) in records.items():
        r = np.lib.format.open_memmap(str(tmp_path / f'{name}.npy'), mode='w+', dtype=dtype, shape=tuple(shape))
        r[...] = np.nan if dtype == 'float32' else -1
        r[:2] = 1  # steps 0 and 1 written
        del r
    runs.check_records(str(tmp_path), records, 2, ['loss', 'offsets'])
    for rows, change, message in [(3, None, 'steps before 3'), (2, -4, 'truncated'), (2, +4, 'not a whole')]:
        path = tmp_path / 'loss.npy'
        size = path.stat().st_size
        if change:
            os.truncate(path, size + change)
        with pytest.raises(SystemExit) as stop:
            runs.check_records(str(tmp_path), records, rows, ['loss', 'offsets'])
        assert stop.value.code == 2 and message in capsys.readouterr().err
        assert path.stat().st_size == size + (change or 0)  # read, never extended with zeros
        os.truncate(path, size)


@pytest.mark.slow
def test_load_run_gives_settings_records_and_the_model_of_a_checkpoint(tiny_run, tmp_path, capsys):
    import numpy as np
    import torch
    from metrics import fp32_forward
    config, records, model = runs.load_run(tiny_run, 12)  # ckpt.pt: the final model
    assert config == json.load(open(os.path.join(tiny_run, 'config.json')))
    assert sorted(records) == sorted(config['records'])
    for name, (shape, dtype) in config['records'].items():
        assert isinstance(records[name], np.memmap) and records[name].shape == tuple(shape), name
        assert records[name].dtype == dtype and not records[name].flags.writeable, name
    tokens = torch.from_numpy(np.load(os.path.join(tiny_run, 'probe_tokens.npy')).astype(np.int64))
    loss = fp32_forward(model, tokens[:, :-1], tokens[:, 1:])[0]  # the final model's probe losses: row S
    np.testing.assert_allclose(loss.detach().numpy(), records['probe_loss'][12], rtol=1e-5, atol=1e-6)
    assert runs.load_run(tiny_run)[2] is None
    with pytest.raises(SystemExit):
        runs.load_run(tiny_run, 6)  # no checkpoint holds step 6 (ckpt.pt holds 12; none kept)
    assert 'no checkpoint of step 6' in capsys.readouterr().err
    torn = str(tmp_path / 'torn')
    shutil.copytree(tiny_run, torn)
    os.truncate(os.path.join(torn, 'ckpt.pt'), 100)  # a copy cut short: one line, never a traceback
    with pytest.raises(SystemExit) as stop:
        runs.load_run(torn, 12)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and 'ckpt.pt: not a checkpoint' in err[0]
