"""Webdataset-style tar shards for the data tests, written member by member as given."""
import io
import tarfile


def write_tar(path, samples):
    """samples: (key, {ext: bytes}) in order; plain ustar members (no pax headers), so byte offsets are predictable."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)
