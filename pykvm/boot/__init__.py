"""Boot formats, one module each: ELF (:mod:`.elf`), multiboot v1 (:mod:`.multiboot`), the x86
Linux boot protocol (:mod:`.linux_x86`), the RISC-V/arm64 Linux Image (:mod:`.linux_image`) and
flat binaries (:mod:`.flat`); :mod:`.image` holds what they share. This module picks the format
of an image (:func:`parse_image`) and loads it (:func:`load_image`).

Loading happens in three steps, each usable on its own:

1. :func:`parse_image` turns the file into a :class:`LoadPlan` (segments, entry, boot mode);
   nothing touches guest memory yet, and every structural problem raises :class:`LoadError`.
2. :meth:`LoadPlan.validate` checks the plan against the guest's RAM (and the VMM's reserved
   window on x86).
3. :func:`write_plan` copies the segments into guest memory and zero-fills their tails.

:func:`load_image` does all three and, for multiboot images, also writes the multiboot
information structure. The memory object only needs ``size``, ``write(gpa, data)`` and
``read(gpa, n)``.

Images come from untrusted places, so the loader bounds everything it does by the size of the
input: only regular files are read, never more than :data:`MAX_IMAGE_SIZE` (a file may be
larger than the guest's RAM, as an ELF with debug information is, when what it loads fits;
the Linux boot protocol's images and initrds are held to the RAM size); the ELF header counts
are capped (:data:`MAX_PROGRAM_HEADERS`, :data:`MAX_SECTION_HEADERS`, :data:`MAX_SYMBOLS`);
each distinct symbol table is read once; segment data are views into the image, never copies per header.
Every failure is a :class:`LoadError` with a one-line message, and nothing is written to guest
memory before all checks have passed.
"""
from .formats import detect, load_image, parse_image
from .image import (ARCHES, MAX_IMAGE_SIZE, STREAM_CHUNK, Image, InputFile, LoadedImage,
                    LoadError, LoadPlan, Segment, copy_into, read_head, validate_plan,
                    write_plan, zero_fill)
from .elf import (MAX_PROGRAM_HEADERS, MAX_SECTION_HEADERS, MAX_SYMBOLS, PARAMS_SIZE,
                  PARAMS_SYMBOL, elf_symbols, find_symbol, is_elf, parse_elf)
from .flat import parse_flat
from .multiboot import (MULTIBOOT_BOOT_MAGIC, MULTIBOOT_HEADER_MAGIC, MultibootHeader,
                        build_multiboot_info, find_multiboot_header, initrd_module_path,
                        multiboot_header_size, parse_multiboot_aout, split_initrd_option)

__all__ = [
    "LoadError", "Segment", "MultibootHeader", "LoadPlan", "LoadedImage",
    "MULTIBOOT_HEADER_MAGIC", "MULTIBOOT_BOOT_MAGIC", "MAX_IMAGE_SIZE", "MAX_PROGRAM_HEADERS",
    "MAX_SECTION_HEADERS", "MAX_SYMBOLS",
    "parse_image", "parse_elf", "parse_flat", "parse_multiboot_aout", "find_multiboot_header",
    "multiboot_header_size", "build_multiboot_info", "validate_plan", "write_plan", "zero_fill",
    "copy_into", "InputFile", "STREAM_CHUNK",
    "load_image",
    "elf_symbols", "find_symbol", "is_elf", "split_initrd_option", "initrd_module_path",
    "PARAMS_SYMBOL", "PARAMS_SIZE", "read_head", "ARCHES", "Image", "detect",
]
