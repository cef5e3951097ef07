// See README.md in this directory.
#pragma once
